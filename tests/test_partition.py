"""Partitions of fedpriv.data: coverage, determinism, label skew, scale, client splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedpriv.data import (
    FederatedDataset,
    client_split,
    describe_partition,
    load_dataset,
    partition_indices,
)
from fedpriv.data import holdout, tabular
from fedpriv.data import partition as part_mod

REPO = Path(__file__).resolve().parents[1]


def make_ds(labels, name="synthetic", natural_ids=None, natural_names=None) -> FederatedDataset:
    labels = np.asarray(labels, dtype=np.int64)
    return FederatedDataset(
        name=name,
        x_train=np.zeros((len(labels), 1), np.float32),
        y_train=labels,
        x_test=np.zeros((0, 1), np.float32),
        y_test=np.zeros(0, np.int64),
        num_classes=int(labels.max()) + 1,
        input_shape=(1,),
        task="tabular",
        natural_ids=natural_ids,
        natural_names=natural_names,
    )


@pytest.fixture(scope="module")
def ds() -> FederatedDataset:
    return make_ds(np.random.default_rng(0).integers(0, 10, 3000))


def heart_root() -> Path:
    env = os.environ.get("FEDPRIV_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "heart-disease").is_dir():
            return cand
    pytest.skip("heart-disease data not found (set FEDPRIV_DATA to a folder holding heart-disease/)")


def check_disjoint_cover(parts, n, exact=True):
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat), "a row is in two clients"
    assert flat.min() >= 0 and flat.max() < n
    if exact:
        assert len(flat) == n


SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3}),
    ("pathological", {"classes_per_client": 2}),
    ("shard", {"shards_per_client": 2}),
]


@pytest.mark.parametrize("scheme, params", SCHEMES)
def test_cover_disjoint_deterministic(ds, scheme, params):
    parts = partition_indices(ds, scheme, 20, seed=1, **params)
    assert len(parts) == 20 and all(p.dtype == np.int64 for p in parts)
    check_disjoint_cover(parts, 3000, exact=scheme != "shard")
    if scheme == "shard":  # whole shards only: fewer than 20 * 2 rows are left out
        assert 3000 - 40 < sum(map(len, parts)) <= 3000
    part_mod.clear_partition_cache()
    again = partition_indices(ds, scheme, 20, seed=1, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(ds, scheme, 20, seed=2, **params)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_cached_read_only_views(ds):
    parts = partition_indices(ds, "dirichlet", 10, seed=0, alpha=0.5)
    again = partition_indices(ds, "dirichlet", 10, 0, alpha=0.5, min_partition_size=min(10, 3000 // 100))
    assert parts is not again and all(a is b for a, b in zip(parts, again))
    assert all(p.base is parts[0].base for p in parts)
    with pytest.raises(ValueError):
        parts[0][0] = 1
    # A different data set with the same name does not get these partitions.
    other = make_ds(np.random.default_rng(5).integers(0, 10, 3000))
    assert not np.array_equal(partition_indices(other, "dirichlet", 10, 0, alpha=0.5)[0], parts[0])


def test_label_skew(ds):
    iid = describe_partition(partition_indices(ds, "iid", 30, 0), ds.y_train)
    dirichlet = describe_partition(partition_indices(ds, "dirichlet", 30, 0, alpha=0.1), ds.y_train)
    assert dirichlet["label_tv_mean"] > iid["label_tv_mean"] + 0.3
    assert iid["label_tv_mean"] < 0.2
    for k in (1, 2, 3):
        patho = partition_indices(ds, "pathological", 25, 0, classes_per_client=k)
        assert max(len(np.unique(ds.y_train[p])) for p in patho) <= k
        check_disjoint_cover(patho, 3000)


def test_iid_matches_flwr_iid_partitioner():
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    n, k, seed = 103, 10, 7
    ds = make_ds(np.arange(n) % 4)
    ours = partition_indices(ds, "iid", k, seed)
    perm = np.random.default_rng(seed).permutation(n)
    partitioner = IidPartitioner(k)
    partitioner.dataset = Dataset.from_dict({"idx": perm, "label": ds.y_train[perm]})
    for i in range(k):
        assert np.array_equal(ours[i], np.asarray(partitioner.load_partition(i)["idx"]))


def test_natural_matches_flwr_natural_id_partitioner():
    from flwr_datasets.partitioner import NaturalIdPartitioner

    ids = np.random.default_rng(1).integers(0, 7, 500)
    ds = make_ds(np.arange(500) % 3, natural_ids=ids, natural_names=tuple(f"c{i}" for i in range(7)))
    ours = partition_indices(ds, "natural", 7, seed=0)
    partitioner = NaturalIdPartitioner(partition_by="user")
    partitioner.dataset = part_mod.make_table(ds.y_train, ids)
    for i in range(7):
        assert np.array_equal(ours[i], np.asarray(partitioner.load_partition(i)["idx"]))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "scheme, params",
    [("dirichlet", {"alpha": 0.5, "min_partition_size": 3}), ("pathological", {"classes_per_client": 3}),
     ("shard", {"shard_size": 40})],
)
def test_fast_path_equals_load_partition_loop(scheme, params):
    """The partitioner's internal mapping gives what load_partition gives, client by client."""
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner, ShardPartitioner

    labels = np.random.default_rng(3).integers(0, 5, 800)
    ds = make_ds(labels)
    ours = partition_indices(ds, scheme, 12, seed=4, **params)
    if scheme == "dirichlet":
        p = DirichletPartitioner(12, "label", alpha=0.5, min_partition_size=3, self_balancing=True, seed=4)
    elif scheme == "pathological":
        p = PathologicalPartitioner(12, "label", 3, class_assignment_mode="first-deterministic", seed=4)
    else:
        p = ShardPartitioner(12, "label", shard_size=40, seed=4)
    p.dataset = part_mod.make_table(labels)
    for i in range(12):
        assert np.array_equal(ours[i], np.asarray(p.load_partition(i)["idx"], dtype=np.int64))


def test_ten_thousand_clients_and_empty_ok():
    # (how fast is a benchmark's question, not a test's: a timed assertion fails by chance on a loaded machine)
    big = make_ds(np.random.default_rng(0).integers(0, 10, 60_000), name="big")
    for scheme, params in (("iid", {}), ("dirichlet", {"alpha": 0.1})):
        parts = partition_indices(big, scheme, 10_000, seed=0, **params)
        check_disjoint_cover(parts, 60_000)
        info = describe_partition(parts, big.y_train)
        assert info["num_clients"] == 10_000 and info["num_rows"] == 60_000
        if scheme == "dirichlet" and params["alpha"] == 0.1:
            assert info["num_empty"] > 0 and info["size_min"] == 0


def test_dirichlet_unreachable_minimum_is_clear(ds):
    with pytest.raises(ValueError, match="lower min_partition_size"):
        partition_indices(ds, "dirichlet", 100, 0, alpha=0.05, min_partition_size=25)


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="unknown partition scheme 'random'"):
        partition_indices(ds, "random", 3, 0)
    with pytest.raises(ValueError, match="takes no parameter.*alpha"):
        partition_indices(ds, "iid", 3, 0, alpha=1.0)
    with pytest.raises(ValueError, match="num_clients"):
        partition_indices(ds, "iid", 0, 0)
    with pytest.raises(ValueError, match="no natural clients"):
        partition_indices(ds, "natural", 3, 0)
    many = partition_indices(ds, "iid", 5000, 0)
    assert sum(len(p) == 0 for p in many) == 2000


def test_natural_heart_disease():
    ds = load_dataset("heart_disease", root=str(heart_root()))
    parts = partition_indices(ds, "natural", 4, seed=0)
    x, y, hosp = tabular.read_heart_disease(str(heart_root()))
    test = holdout.stratified_holdout(y, 0.2, 0, groups=hosp)
    sizes = [len(p) for p in parts]
    assert [s + int(t) for s, t in zip(sizes, np.bincount(hosp[test], minlength=4))] == [303, 261, 46, 130]
    for k, p in enumerate(parts):
        assert np.all(ds.natural_ids[p] == k)
    check_disjoint_cover(parts, len(ds.y_train))
    with pytest.raises(ValueError, match="exactly 4 clients; set num_clients=4"):
        partition_indices(ds, "natural", 10, seed=0)


def test_client_split():
    idx = np.arange(100, 200)
    tr, va = client_split(idx, 0.2, seed=0, client_id=3)
    assert len(va) == 20 and len(tr) == 80
    assert np.array_equal(np.sort(np.r_[tr, va]), idx)
    tr2, va2 = client_split(idx, 0.2, seed=0, client_id=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(client_split(idx, 0.2, seed=0, client_id=4)[1], va)
    assert not np.array_equal(client_split(idx, 0.2, seed=1, client_id=3)[1], va)
    assert [len(x) for x in client_split(idx[:2], 0.1, 0, 0)] == [1, 1]
    assert [len(x) for x in client_split(idx[:1], 0.5, 0, 0)] == [1, 0]
    assert [len(x) for x in client_split(idx[:0], 0.5, 0, 0)] == [0, 0]
    assert [len(x) for x in client_split(idx, 0.0, 0, 0)] == [100, 0]
    with pytest.raises(ValueError, match="val_fraction"):
        client_split(idx, 1.0, 0, 0)


def test_describe_partition_numbers():
    labels = np.array([0, 0, 1, 1])
    info = describe_partition([np.array([0, 2]), np.array([1]), np.array([3]), np.array([], np.int64)], labels)
    assert info["num_empty"] == 1 and info["size_max"] == 2 and info["num_rows"] == 4
    assert info["label_tv_mean"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert info["classes_per_client_max"] == 2 and info["coverage"] == 1.0
