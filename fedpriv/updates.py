"""Model updates as arrays: difference, L2 norm, clipping. Used by the server and by clients.

Only floating-point arrays carry an update; integer buffers (BatchNorm's counters) cannot be
clipped or noised meaningfully, so a model that has them is refused with a clear message.
"""

from __future__ import annotations

import numpy as np

from fedpriv.errors import UserError

Arrays = dict[str, np.ndarray]


class IntegerBufferError(UserError):
    """The model holds integer arrays, which differential privacy here cannot cover."""


def check_float_arrays(arrays: Arrays) -> None:
    bad = [k for k, v in arrays.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise IntegerBufferError(
            f"model has integer buffers {bad[:3]}{'...' if len(bad) > 3 else ''}: they cannot be clipped or noised; "
            "use GroupNorm instead of BatchNorm (all fedpriv models do)"
        )


def difference(new: Arrays, old: Arrays) -> Arrays:
    """``new - old`` per array, in float64 for accumulation."""
    if new.keys() != old.keys():
        raise ValueError(f"update keys differ from the model's: {sorted(set(new) ^ set(old))[:5]}")
    out = {}
    for k in old:
        if new[k].shape != old[k].shape:
            raise ValueError(f"update array {k!r} has shape {new[k].shape}, the model's is {old[k].shape}")
        out[k] = new[k].astype(np.float64) - old[k].astype(np.float64)
    return out


def update_problem(new: Arrays, old: Arrays) -> str | None:
    """Why a client's model cannot be aggregated (None if it can): other keys, shapes or dtypes
    than the global model's, or a NaN / infinite value (one would make the whole release NaN)."""
    if new.keys() != old.keys():
        return f"arrays {sorted(set(new) ^ set(old))[:3]} differ from the model's"
    for k, ref in old.items():
        v = new[k]
        if v.shape != ref.shape:
            return f"array {k!r} has shape {tuple(v.shape)}, the model's is {tuple(ref.shape)}"
        if not np.issubdtype(v.dtype, np.floating):
            return f"array {k!r} has dtype {v.dtype}, not floating point"
        if not np.all(np.isfinite(v)):
            return f"array {k!r} holds NaN or infinite values"
    return None


def l2_norm(arrays: Arrays) -> float:
    """The L2 norm of all arrays taken together as one vector."""
    return float(np.sqrt(sum(float(np.vdot(v, v)) for v in arrays.values())))


def clip(arrays: Arrays, clip_norm: float) -> tuple[Arrays, float, bool]:
    """Scale to L2 norm at most ``clip_norm``; returns (clipped, original norm, was_clipped).

    A zero update stays zero (no division by its norm).
    """
    norm = l2_norm(arrays)
    if norm <= clip_norm:
        return arrays, norm, False
    factor = clip_norm / norm
    return {k: v * factor for k, v in arrays.items()}, norm, True


def add(a: Arrays, b: Arrays) -> Arrays:
    return {k: a[k] + b[k] for k in a}


def num_parameters(arrays: Arrays) -> int:
    return int(sum(v.size for v in arrays.values()))


def to_record(arrays: Arrays):
    """A Flower ArrayRecord holding ``arrays`` (keys and order kept)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record) -> Arrays:
    """The arrays of a Flower ArrayRecord as NumPy, by key."""
    return {k: v.numpy() for k, v in record.items()}
