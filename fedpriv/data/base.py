"""The data-set record shared by loaders, partitioners and training code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpriv.errors import DataError  # one line naming the file, or every place searched

__all__ = ["DataError", "FederatedDataset", "TASKS"]

TASKS = ("image", "tabular", "next_char", "text_classification")


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A whole data set as arrays plus the metadata a model and a partitioner need.

    Arrays are read-only. Large ones (``x_train`` / ``x_test`` of Fashion-MNIST,
    CIFAR-10 and Shakespeare) are ``np.memmap`` views of ``.npy`` files in the cache
    directory, so every process that loads the data set shares the same page-cache
    pages; index them (``x_train[idx]``) to get a private, writable copy of a client's
    rows. Do not ship a ``FederatedDataset`` between processes (pickling a memmap
    copies it); call :func:`fedpriv.data.load_dataset` in each process instead.

    ``eq=False``: two records compare by identity (comparing arrays element-wise is
    neither cheap nor meaningful), which also makes them hashable.

    Attributes:
        name: registry name (``"digits"``, ``"fashion_mnist"``, ...).
        x_train, x_test: float32 features. Images are ``(N, C, H, W)`` normalised with
            the data set's mean/std; tabular data ``(N, F)`` standardised with
            statistics of the training rows only; Shakespeare ``int64 (N, seq_len)``
            character ids.
        y_train, y_test: int64 labels (the next character's id for Shakespeare).
        num_classes: number of output classes.
        input_shape: shape of one example (``x_train.shape[1:]``).
        task: ``"image"``, ``"tabular"``, ``"next_char"`` (predict the id after a window) or
            ``"text_classification"`` (a label per text; ``x`` is right-padded token ids, 0 = pad).
        natural_ids: for data sets with natural clients, an int64 client id per
            training row, ids ``0 .. len(natural_names) - 1``, each with at least one
            row; otherwise ``None``.
        natural_names: client id -> human readable name, or ``None``.
        vocab_size: size of the vocabulary (Shakespeare's characters, Sent140's tokens), else ``None``.
        test_user_ids: for data sets that hold whole users out for test (Sent140), an int64 id per
            test row naming its held-out user (none of them a client), else ``None``.
        tokenizer: the JSON of the :mod:`tokenizers` tokenizer that made the ids (text data sets), or
            ``None``; saved beside a language model so that its ids mean the same (:mod:`.text`).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    task: str
    natural_ids: np.ndarray | None
    natural_names: tuple[str, ...] | None
    vocab_size: int | None = None
    tokenizer: str | None = None
    test_user_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task {self.task!r} is not one of {TASKS}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"{self.name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name}: x_{split} rows have shape {x.shape[1:]}, "
                    f"input_shape says {self.input_shape}"
                )
        if (self.natural_ids is None) != (self.natural_names is None):
            raise ValueError(f"{self.name}: natural_ids and natural_names go together")
        if self.natural_ids is not None and len(self.natural_ids) != len(self.y_train):
            raise ValueError(
                f"{self.name}: natural_ids has {len(self.natural_ids)} entries for "
                f"{len(self.y_train)} training rows"
            )
        if self.test_user_ids is not None and len(self.test_user_ids) != len(self.y_test):
            raise ValueError(f"{self.name}: test_user_ids has {len(self.test_user_ids)} entries for {len(self.y_test)} test rows")

    @property
    def num_natural_clients(self) -> int | None:
        """Number of natural clients, or ``None`` when the data set has none."""
        return None if self.natural_names is None else len(self.natural_names)
