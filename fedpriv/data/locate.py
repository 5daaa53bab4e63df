"""Where data files are looked for: the data roots in search order, and the not-found error.

Each root is tried with the data set's sub-folder and as the folder holding the files itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fedpriv.errors import ConfigError

from .base import DataError

DATA_ENV = "FEDPRIV_DATA"
SYSTEM_ROOTS = (Path("/usr/share/datasets"),)
PROJECT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_root(root: str | os.PathLike | None) -> list[Path]:
    """Data roots in search order: ``root``, ``$FEDPRIV_DATA``, project shared data, system.

    1. the ``root`` argument (config ``data.root``; a folder named there must exist, see
       :func:`check_data_root`: it is never silently replaced by the folders below),
    2. ``$FEDPRIV_DATA``,
    3. ``<project>/../shared/data`` when that folder exists (the offline copies that
       tests and CI use),
    4. ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` installs there).

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


def candidate_dirs(root: str | os.PathLike | None, subdir: str) -> list[Path]:
    """Every data root twice, in search order: with ``subdir`` (``fashion-mnist``, ...), then as is."""
    dirs: list[Path] = []
    for r in resolve_data_root(root):
        dirs.extend((r / subdir, r))
    return dirs


def find_files(
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


def not_found(what: str, notes: Sequence[str], hub: str | None = None) -> DataError:
    """The one-line ``DataError``: what is missing, every place looked in, why the hub was not tried."""
    msg = f"{what} not found; looked in: {'; '.join(notes)}"
    if hub:
        msg += f"; Hugging Face hub not tried: {hub}"
    return DataError(msg + f" (set {DATA_ENV} or data.root)")
