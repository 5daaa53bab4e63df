"""On-disk cache of decoded data sets, shared by every process on a machine.

A cache entry is a directory ``<cache>/<dataset>-<key>/`` of ``.npy`` files plus a
``meta.json``. The key hashes the loader's format version and the identity of the
source files (absolute path, size, modification time), so a changed source file or a
changed decoder gives a new entry instead of stale arrays (loaders pass a version
string such as ``"fashion_mnist/1"``: bump it whenever a decoder's output changes).
Old entries are not deleted automatically; remove the directory to reclaim space.

Entries are built in a private temporary directory and renamed into place, which is
atomic on one file system: a reader sees a complete entry or none. While one process
builds an entry, others wait on a ``flock`` (POSIX) instead of decoding the same data
again; after a crashed build the lock is released by the OS and the next process
rebuilds. Large arrays are opened with ``mmap_mode="r"``: Ray workers and other
processes then share one copy in the page cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "FEDPRIV_CACHE"
DEFAULT_CACHE = Path("~/.cache/fedpriv")

_fallback_dir: Path | None = None


def cache_dir() -> Path:
    """The cache root: ``$FEDPRIV_CACHE``, else ``~/.cache/fedpriv``.

    Read on every call, so tests and launchers may change the variable at run time.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def _writable_cache_dir() -> Path:
    """The cache root, created if needed; a per-process temp dir if it is not writable."""
    global _fallback_dir
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    if _fallback_dir is None:
        _fallback_dir = Path(tempfile.mkdtemp(prefix="fedpriv-cache-"))
        warnings.warn(
            f"cache directory {root} is not writable (set {CACHE_ENV}); decoded data "
            f"goes to {_fallback_dir} for this process only",
            stacklevel=3,
        )
    return _fallback_dir


def source_key(version: str, *parts: Any, files: Sequence[Path] = ()) -> str:
    """A short hash of a decoder version, parameters and source files' identity."""
    h = hashlib.blake2b(digest_size=8)
    h.update(version.encode())
    for part in parts:
        h.update(b"\0" + repr(part).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"\0{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: builds may race, the rename keeps entries whole
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_entry(entry: Path, mmap: Sequence[str]) -> tuple[dict[str, np.ndarray], dict]:
    meta = json.loads((entry / "meta.json").read_text())
    arrays: dict[str, np.ndarray] = {}
    for name in meta["arrays"]:
        path = entry / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r" if name in mmap else None)
        except ValueError:  # an empty array cannot be memory-mapped
            arr = np.load(path)
        if not isinstance(arr, np.memmap):
            arr.setflags(write=False)
        arrays[name] = arr
    return arrays, meta["info"]


def lookup_cached(
    dataset: str, key: str, mmap: Sequence[str] = ("x_train", "x_test")
) -> tuple[dict[str, np.ndarray], dict] | None:
    """``(arrays, info)`` of an existing cache entry, or ``None``; never builds."""
    entry = cache_dir() / f"{dataset}-{key}"
    try:
        return _open_entry(entry, mmap) if entry.is_dir() else None
    except (FileNotFoundError, ValueError, OSError, KeyError):
        return None


def cached_arrays(
    dataset: str,
    key: str,
    build: Callable[[Path], dict],
    mmap: Sequence[str] = ("x_train", "x_test"),
) -> tuple[dict[str, np.ndarray], dict]:
    """Return ``(arrays, info)`` of a cache entry, building it first if missing.

    ``build(out_dir)`` writes one ``<name>.npy`` per array into ``out_dir`` (directly,
    or through ``np.lib.format.open_memmap`` to keep peak memory low) and returns a
    JSON-serialisable ``info`` dict. Arrays named in ``mmap`` are memory-mapped
    read-only; the others are read into memory and marked read-only.
    """
    root = _writable_cache_dir()
    entry = root / f"{dataset}-{key}"
    with contextlib.suppress(FileNotFoundError, ValueError, OSError, KeyError):
        if entry.is_dir():
            return _open_entry(entry, mmap)
    with file_lock(root / f"{dataset}-{key}.lock"):
        if entry.is_dir():
            try:
                return _open_entry(entry, mmap)
            except (FileNotFoundError, ValueError, OSError, KeyError):
                shutil.rmtree(entry, ignore_errors=True)  # damaged entry: rebuild
        tmp = Path(tempfile.mkdtemp(prefix=f".{dataset}-{key}-", dir=root))
        try:
            info = build(tmp)
            names = sorted(p.stem for p in tmp.glob("*.npy"))
            (tmp / "meta.json").write_text(json.dumps({"arrays": names, "info": info}))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users may share the cache
            try:
                os.rename(tmp, entry)
            except OSError:  # another builder won the race (no flock on this system)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _open_entry(entry, mmap)


def write_normalised(
    path: Path,
    raw: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 255.0,
    chunk: int = 4096,
) -> None:
    """Write ``(raw / scale - mean) / std`` as float32 ``(N, C, H, W)`` to ``path``.

    ``raw`` is ``(N, H, W)`` (one channel) or ``(N, H, W, C)``; the conversion runs in
    chunks so peak memory stays near the size of ``raw`` plus one chunk.
    """
    if raw.ndim == 3:
        raw = raw[..., None]
    n, h, w, c = raw.shape
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, c, h, w))
    for start in range(0, n, chunk):
        block = raw[start : start + chunk].transpose(0, 3, 1, 2).astype(np.float32)
        block /= np.float32(scale)
        block -= mean_a
        block /= std_a
        out[start : start + chunk] = block
    out.flush()
    del out
