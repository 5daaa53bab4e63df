"""Image data sets: scikit-learn's digits, Fashion-MNIST (IDX files) and CIFAR-10 (JPEG tarball).

Fashion-MNIST and CIFAR-10 fall back to the Hugging Face hub; decoded arrays live in the cache.
"""

from __future__ import annotations

import importlib.util
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from .base import DataError, FederatedDataset
from .cache import cached_arrays, source_key, write_normalised
from .holdout import HOLDOUT_FRACTION, HOLDOUT_SEED, readonly, stratified_holdout
from .hub import from_hub_or_fail
from .idx import read_idx
from .locate import candidate_dirs, find_files

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


# ---------------------------------------------------------------- helpers


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


def _write_images(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], per_channel: bool) -> None:
    if per_channel:
        mean, std = _channel_stats(splits["train"][0])
    else:
        mean, std = [FASHION_MEAN], [FASHION_STD]
    for split, (images, labels) in splits.items():
        write_normalised(out / f"x_{split}.npy", images, mean, std)
        np.save(out / f"y_{split}.npy", labels.astype(np.int64))


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
    readonly(x_train, x_test, y_train, y_test)
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


def load_fashion_mnist(root: str | os.PathLike | None = None) -> FederatedDataset:
    """Fashion-MNIST from IDX files (60,000 / 10,000, ``(N, 1, 28, 28)``).

    Normalised with mean 0.2860 / std 0.3530. Decoded once into the cache and
    memory-mapped afterwards.
    """
    files, notes = find_files(candidate_dirs(root, "fashion-mnist"), FASHION_FILES)
    if files is not None:
        key = source_key("fashion_mnist/1", FASHION_MEAN, FASHION_STD, files=list(files.values()))
        arrays, _ = cached_arrays("fashion_mnist", key, _fashion_build(files))
    else:
        arrays = from_hub_or_fail(
            "fashion_mnist", "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
            notes, FASHION_HUB, "image", per_channel=False, write=_write_images,
        )
    return _image_dataset("fashion_mnist", arrays, 10)


# ---------------------------------------------------------------- CIFAR-10


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
    files, notes = find_files(candidate_dirs(root, "cifar10"), {"tar": CIFAR10_TARBALL}, gz_ok=False)
    if files is not None:
        tar = files["tar"]

        def build(out: Path) -> dict:
            _write_images(out, decode_cifar_tarball(tar), per_channel=True)
            return {"source": str(tar)}

        key = source_key("cifar10/1", files=[tar])
        arrays, _ = cached_arrays("cifar10", key, build)
    else:
        arrays = from_hub_or_fail(
            "cifar10", f"CIFAR-10 archive {CIFAR10_TARBALL}", notes, CIFAR10_HUB, "img",
            per_channel=True, write=_write_images,
        )
    return _image_dataset("cifar10", arrays, 10)
