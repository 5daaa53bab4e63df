"""Durable file replacement: a crash or power loss at any point leaves the old file or the new one,
whole, on disk (write a temporary file, fsync it, rename it over the old one, fsync the folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO


def durable_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` with what ``write`` writes to a binary file object, durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is on disk only once its folder is
    finally:
        os.close(fd)


def durable_write_text(path: str | Path, text: str) -> None:
    durable_write(path, lambda f: f.write(text.encode()))
