"""Reader for the IDX format of (Fashion-)MNIST, with strict validation.

IDX layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d``
big-endian uint32 sizes, then the data in C order. Files may be gzip-compressed.
Every defect (bad gzip stream, wrong magic, unexpected type or rank, data shorter or
longer than the header says) raises :class:`~fedpriv.data.base.DataError` naming the
file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .base import DataError

# IDX type code -> numpy dtype (multi-byte types are big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        detail = str(exc) or type(exc).__name__
        raise DataError(f"{path}: unreadable or truncated file ({detail})") from None


def parse_idx(data: bytes, path: Path | str = "<bytes>", ndim: int | None = None,
              dtype: np.dtype | None = None) -> np.ndarray:
    """Parse IDX bytes into a read-only array; ``path`` only labels error messages."""
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path}: bad IDX magic number 0x{data[:4].hex()}")
    file_dtype, file_ndim = IDX_DTYPES[data[2]], data[3]
    if dtype is not None and file_dtype != np.dtype(dtype):
        raise DataError(f"{path}: IDX data type is {file_dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and file_ndim != ndim:
        raise DataError(f"{path}: IDX has {file_ndim} dimensions, expected {ndim}")
    header = 4 + 4 * file_ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=file_ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * file_dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes in"
        raise DataError(
            f"{path}: {what} IDX data (header {dims} needs {expected} bytes, found {found})"
        )
    return np.frombuffer(data, dtype=file_dtype, offset=header).reshape(dims)


def read_idx(path: Path, ndim: int | None = None, dtype: np.dtype | None = None) -> np.ndarray:
    """Read and validate one IDX file (``.gz`` or raw); raise ``DataError`` naming it."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path, ndim=ndim, dtype=dtype)
