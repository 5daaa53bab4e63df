"""The central test split every in-memory data set shares (stratified, fixed seed), and read-only arrays."""

from __future__ import annotations

import numpy as np

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0


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


def readonly(*arrays: np.ndarray) -> None:
    """Mark in-memory arrays read-only (memory-mapped ones are left as they are)."""
    for a in arrays:
        if a is not None and not isinstance(a, np.memmap):
            a.setflags(write=False)
