"""Split a data set's training rows among clients: index arrays, never copies.

Schemes and their parameters (defaults in brackets):

``iid``
    Rows shuffled with ``seed``, then cut into ``num_clients`` contiguous blocks whose
    sizes differ by at most one (flwr-datasets ``IidPartitioner`` over the shuffled
    index table; computed here with the same arithmetic, see below).
``dirichlet``: ``alpha`` [0.5], ``min_partition_size`` [``min(10, N // (10 K))``],
    ``self_balancing`` [True]
    flwr-datasets ``DirichletPartitioner``: per class, Dirichlet(alpha) proportions
    over clients. The default minimum is at most a tenth of the mean client size, so
    10,000 clients on 60,000 rows use 0 (empty clients allowed) instead of resampling
    forever; if a minimum cannot be met in the partitioner's 11 attempts a
    ``ValueError`` says which knob to turn.
``pathological``: ``classes_per_client`` [2], ``class_assignment_mode``
    [``"first-deterministic"``]
    flwr-datasets ``PathologicalPartitioner``: each client holds rows of at most
    ``classes_per_client`` labels. The default mode gives client ``i`` label
    ``i mod C`` first, so every label is used once ``num_clients >= C``.
``shard``: ``shards_per_client`` [2 unless ``shard_size`` alone is given], ``shard_size``
    flwr-datasets ``ShardPartitioner`` (McMahan et al.): rows sorted by label, cut into
    shards, shards dealt at random. Rows left over after the last whole shard are not
    assigned (fewer than ``num_clients * shards_per_client`` rows).
``natural``
    One client per natural id (hospital, speaking role); ``num_clients`` must equal
    the data set's number of natural clients. Client ``k`` is natural id ``k`` (the
    name is ``ds.natural_names[k]``), rows in ascending order: the result of
    flwr-datasets ``NaturalIdPartitioner`` on the natural-id column.

How flwr-datasets is used at scale. Calling ``load_partition`` once per client builds
a ``datasets.Dataset`` per call (measured: ~2 ms each, so ~20 s for 10,000 clients).
Instead, for ``dirichlet``/``pathological``/``shard`` the partitioner runs once over a
small ``(idx, label)`` table in Arrow format (the default Python format makes the
partitioners read the label column row by row: 1.5 s per read for 60,000 rows), one
``load_partition(0)`` call triggers its full assignment, and the assignment is read
from the partitioner's mapping ``_partition_id_to_indices`` (present in
flwr-datasets 0.6). Client 0's rows are checked against the public
``load_partition(0)`` result; if the mapping is missing or disagrees, the code falls
back to calling ``load_partition`` for every client. ``iid`` and ``natural`` involve
no sampling beyond the seeded shuffle, so they are computed with numpy directly (no
``datasets`` import, ~ms); tests check them against the partitioners.

Result and memory: one int64 array of all assigned row indices (read-only) and
``num_clients`` views into it, computed once per process and cached under
``(data set name, fingerprint of its labels, scheme, num_clients, seed, params)``.
Callers get a new list of the same read-only views each time.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import FederatedDataset

SCHEMES = ("iid", "dirichlet", "pathological", "shard", "natural")
_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
    "pathological": ("classes_per_client", "class_assignment_mode"),
    "shard": ("shards_per_client", "shard_size"),
    "natural": (),
}

_cache: dict[tuple, tuple[np.ndarray, tuple[np.ndarray, ...]]] = {}
_cache_lock = threading.Lock()
_fingerprints: weakref.WeakKeyDictionary[FederatedDataset, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


# ---------------------------------------------------------------- public API


def partition_indices(
    ds: FederatedDataset, scheme: str, num_clients: int, seed: int, **params: Any
) -> list[np.ndarray]:
    """Training-row indices of every client: ``result[k]`` is client ``k``'s rows.

    Deterministic for a seed; cached per process. Clients may be empty (``iid`` with
    more clients than rows, ``dirichlet`` with ``min_partition_size=0``); use
    :func:`describe_partition` to report sizes and label skew. The arrays are
    read-only views of one shared buffer.

    Raises ``ValueError`` for an unknown scheme or parameter, an impossible
    configuration, or ``natural`` with the wrong ``num_clients`` (the message names
    the right count).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    unknown = sorted(set(params) - set(_PARAMS[scheme]))
    if unknown:
        allowed = ", ".join(_PARAMS[scheme]) or "none"
        raise ValueError(f"partition scheme {scheme!r} takes no parameter(s) {unknown}; allowed: {allowed}")
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients, seed = int(num_clients), int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    resolved = _resolve_params(ds, scheme, num_clients, params)
    key = (
        ds.name, _fingerprint(ds, scheme), scheme, num_clients, seed,
        tuple(sorted(resolved.items())),
    )
    with _cache_lock:
        hit = _cache.get(key)
        if hit is None:
            flat, sizes = _compute(ds, scheme, num_clients, seed, resolved)
            flat = np.ascontiguousarray(flat, dtype=np.int64)
            flat.setflags(write=False)
            bounds = np.cumsum(sizes)[:-1]
            hit = (flat, tuple(np.split(flat, bounds)))
            _cache[key] = hit
    return list(hit[1])


def client_split(
    indices: np.ndarray, val_fraction: float, seed: int, client_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's rows into ``(train, validation)``, both sorted.

    Deterministic in ``(seed, client_id)`` and independent of other clients. The
    validation part has ``floor(val_fraction * n)`` rows, at least one when
    ``val_fraction > 0`` and ``n >= 2``, and never all rows (a client keeps at least one
    training row). ``val_fraction`` must be in ``[0, 1)``.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    indices = np.asarray(indices)
    n = len(indices)
    n_val = math.floor(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    if n_val == 0:
        return np.sort(indices), indices[:0].copy()
    mask64 = (1 << 64) - 1
    rng = np.random.default_rng([int(seed) & mask64, int(client_id) & mask64, 0x5E1])
    perm = rng.permutation(n)
    return np.sort(indices[perm[n_val:]]), np.sort(indices[perm[:n_val]])


def describe_partition(
    parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int | None = None
) -> dict[str, float | int]:
    """Sizes and label skew of a partition, as plain numbers for logs and trackers.

    ``labels`` are all training labels (``ds.y_train``). Label skew is the total
    variation distance between a client's label distribution and the global one
    (0 = same mix, 1 = disjoint); mean and max over non-empty clients.
    """
    labels = np.asarray(labels, dtype=np.int64)
    c = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 1)
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    k = len(sizes)
    assigned = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if k else np.empty(0, np.int64)
    owner = np.repeat(np.arange(k, dtype=np.int64), sizes)
    counts = np.bincount(owner * c + labels[assigned], minlength=k * c).reshape(k, c)
    global_dist = np.bincount(labels, minlength=c) / max(len(labels), 1)
    nonempty = sizes > 0
    if nonempty.any():
        dist = counts[nonempty] / sizes[nonempty, None]
        tv = 0.5 * np.abs(dist - global_dist).sum(axis=1)
        classes = (counts[nonempty] > 0).sum(axis=1)
    else:
        tv = classes = np.zeros(1)
    return {
        "num_clients": int(k),
        "num_rows": int(sizes.sum()),
        "coverage": float(sizes.sum() / max(len(labels), 1)),
        "num_empty": int(k - nonempty.sum()),
        "size_min": int(sizes.min()) if k else 0,
        "size_mean": float(sizes.mean()) if k else 0.0,
        "size_median": float(np.median(sizes)) if k else 0.0,
        "size_max": int(sizes.max()) if k else 0,
        "classes_per_client_mean": float(classes.mean()),
        "classes_per_client_max": int(classes.max()),
        "label_tv_mean": float(tv.mean()),
        "label_tv_max": float(tv.max()),
    }


def clear_partition_cache() -> None:
    """Forget cached partitions (tests)."""
    with _cache_lock:
        _cache.clear()


# ---------------------------------------------------------------- internals


def _fingerprint(ds: FederatedDataset, scheme: str) -> str:
    """Hash of the labels (and natural ids) that the partition depends on."""
    cached = _fingerprints.setdefault(ds, {})
    what = "natural" if scheme == "natural" else "labels"
    if what not in cached:
        h = hashlib.blake2b(digest_size=8)
        arr = ds.natural_ids if what == "natural" else ds.y_train
        if arr is not None:
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        cached[what] = h.hexdigest()
    return cached[what]


def _resolve_params(ds: FederatedDataset, scheme: str, k: int, params: dict) -> dict:
    n = len(ds.y_train)
    if scheme == "dirichlet":
        alpha = float(params.get("alpha", 0.5))
        if not alpha > 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        mps = params.get("min_partition_size")
        mps = min(10, n // (10 * k)) if mps is None else int(mps)
        return {"alpha": alpha, "min_partition_size": mps,
                "self_balancing": bool(params.get("self_balancing", True))}
    if scheme == "pathological":
        return {"classes_per_client": int(params.get("classes_per_client", 2)),
                "class_assignment_mode": str(params.get("class_assignment_mode", "first-deterministic"))}
    if scheme == "shard":
        spc, size = params.get("shards_per_client"), params.get("shard_size")
        if spc is None and size is None:
            spc = 2
        return {"shards_per_client": None if spc is None else int(spc),
                "shard_size": None if size is None else int(size)}
    return {}


def _compute(
    ds: FederatedDataset, scheme: str, k: int, seed: int, p: dict
) -> tuple[np.ndarray, np.ndarray]:
    """``(flat row indices, sizes per client)`` for one scheme."""
    labels = np.asarray(ds.y_train, dtype=np.int64)
    n = len(labels)
    if scheme == "iid":
        return np.random.default_rng(seed).permutation(n), iid_sizes(n, k)
    if scheme == "natural":
        return _natural(ds, k)
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    if scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=k, partition_by="label", alpha=p["alpha"],
            min_partition_size=p["min_partition_size"],
            self_balancing=p["self_balancing"], shuffle=True, seed=seed,
        )
    elif scheme == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=k, partition_by="label",
            num_classes_per_partition=p["classes_per_client"],
            class_assignment_mode=p["class_assignment_mode"], shuffle=True, seed=seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions=k, partition_by="label",
            num_shards_per_partition=p["shards_per_client"], shard_size=p["shard_size"],
            shuffle=True, seed=seed,
        )
    try:
        parts = run_partitioner(partitioner, labels)
    except ValueError as exc:
        hint = ""
        if scheme == "dirichlet" and "attempts" in str(exc):
            hint = (
                f" (no draw gave every client >= {p['min_partition_size']} rows; lower "
                f"min_partition_size, 0 allows empty clients, or raise alpha)"
            )
        raise ValueError(
            f"{scheme} partition of {ds.name} ({n} rows) into {k} clients with {p}: {exc}{hint}"
        ) from exc
    sizes = np.fromiter((len(x) for x in parts), dtype=np.int64, count=k)
    flat = np.concatenate(parts) if k else np.empty(0, np.int64)
    return flat, sizes


def iid_sizes(n: int, k: int) -> np.ndarray:
    """Block sizes of ``datasets.Dataset.shard(k, i, contiguous=True)`` for ``i < k``."""
    return n // k + (np.arange(k) < n % k).astype(np.int64)


def _natural(ds: FederatedDataset, k: int) -> tuple[np.ndarray, np.ndarray]:
    if ds.natural_ids is None or ds.natural_names is None:
        raise ValueError(
            f"{ds.name} has no natural clients; use iid, dirichlet, pathological or shard"
        )
    count = len(ds.natural_names)
    if k != count:
        raise ValueError(
            f"natural partition of {ds.name} has exactly {count} clients; set num_clients={count} (got {k})"
        )
    ids = np.asarray(ds.natural_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    return order, np.bincount(ids, minlength=count)


def make_table(labels: np.ndarray, users: np.ndarray | None = None):
    """The small ``(idx, label[, user])`` table partitioners work on, in Arrow format."""
    from datasets import Dataset

    columns = {"idx": np.arange(len(labels), dtype=np.int64), "label": np.asarray(labels)}
    if users is not None:
        columns["user"] = np.asarray(users)
    return Dataset.from_dict(columns).with_format("arrow")


def run_partitioner(partitioner, labels: np.ndarray, users: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices of every partition of a flwr-datasets partitioner, computed once."""
    partitioner.dataset = make_table(labels, users)
    with warnings.catch_warnings():
        # Retry notices of DirichletPartitioner (the final failure still raises) and a
        # pyarrow deprecation inside datasets' sort.
        warnings.filterwarnings("ignore", message=".*min_partition_size.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
        first = np.asarray(partitioner.load_partition(0)["idx"], dtype=np.int64)
    k = partitioner.num_partitions
    # The partitioner may have reordered its table (ShardPartitioner sorts by label):
    # its positions map to our rows through the table's own idx column.
    rows = np.asarray(partitioner.dataset["idx"], dtype=np.int64)
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and len(mapping) == k:
        parts = [rows[np.asarray(mapping[i], dtype=np.int64)] for i in range(k)]
        if np.array_equal(parts[0], first):
            return parts
    return [first] + [
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(1, k)
    ]
