"""Gaussian noise samplers for central DP, behind one small interface.

* ``numpy``  -- :class:`NumpyGaussian`: fast, NOT cryptographically secure, NOT floating-point safe.
* ``opendp`` -- :class:`OpenDPGaussian`: OpenDP's Gaussian mechanism; CSPRNG, floating-point safe.

Floating-point attacks (Mironov, CCS 2012) exploit the gaps and irregular spacing of noise drawn
as ``float(f(uniform))``: the set of reachable outputs of ``x + noise`` depends on ``x``. Call
:meth:`GaussianSampler.add_noise` on the released values rather than ``values + sample(...)``:
for OpenDP that is the case its proof covers (the addition is exact, then rounded once).
"""

from __future__ import annotations

import math
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np

KINDS = ("numpy", "opendp")


@runtime_checkable
class GaussianSampler(Protocol):
    """Draws i.i.d. N(0, std^2) noise as float64; ``std == 0`` gives zeros (values unchanged)."""

    name: str
    secure: bool  # True only when drawn from a CSPRNG by a floating-point-safe algorithm

    def sample(self, shape: tuple[int, ...], std: float) -> np.ndarray: ...

    def add_noise(self, values: np.ndarray, std: float) -> np.ndarray: ...


def _check_std(std: float) -> float:
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    return std


class NumpyGaussian:
    """numpy ``Generator(PCG64)``: ``Generator.normal`` (256-level ziggurat, float64 arithmetic).

    Randomness: PCG64 (a 128-bit permuted congruential generator; statistically good, not a
    CSPRNG), seeded through ``SeedSequence`` with ``secrets.randbits(128)`` from the OS CSPRNG
    when ``seed`` is None, else with ``seed`` (reproducible research runs, NOT for release).
    Floating-point: continuous sampling in float64, open to Mironov-type attacks. ``secure`` is
    therefore always False. The generator state is never exposed: no ``state_dict``, and the
    object refuses to be pickled or copied (a checkpoint must not carry the noise's seed).
    """

    name = "numpy"
    secure = False

    def __init__(self, seed: int | None = None):
        self.seeded = seed is not None
        self.__rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)

    def sample(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        std = _check_std(std)
        out = self.__rng.normal(0.0, std, size=tuple(shape))  # drawn even at std 0: the stream stays aligned
        return np.zeros(tuple(shape)) if std == 0 else np.asarray(out, dtype=np.float64)

    def add_noise(self, values: np.ndarray, std: float) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return values + self.sample(values.shape, std)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("NumpyGaussian holds the noise generator: it cannot be pickled, copied or checkpointed")

    def __repr__(self) -> str:
        return f"NumpyGaussian(seeded={self.seeded})"


class OpenDPGaussianUnavailable(ImportError):
    """The ``opendp`` package (``pip install "opendp>=0.12,<0.17"``) cannot be imported."""


class OpenDPGaussian:
    """OpenDP's vector Gaussian mechanism, ``opendp.measurements.make_gaussian`` over
    ``vector_domain(atom_domain(T=float, nan=False), size=n)`` with ``l2_distance(T=float)``.

    Randomness: every bit comes from OpenDP's ``fill_bytes``, i.e. OpenSSL's CSPRNG (in the opendp
    0.16.0 PyPI wheel ``fill_bytes`` calls ``RAND_priv_bytes``: checked in its binary; releases up
    to 0.14 call ``RAND_bytes``). Nothing can be seeded; no state is kept between draws.

    Algorithm (OpenDP docs, "Additive Noise Mechanisms > Desideratum: Floating-Point Granularity",
    https://docs.opendp.org/en/stable/api/user-guide/measurements/additive-noise-mechanisms.html;
    proof: https://docs.opendp.org/en/v0.16.0/proofs/rust/src/measurements/noise/distribution/gaussian/make_gaussian.pdf):
    each float input is converted exactly to a rational and rounded to the nearest multiple of
    ``2^k``; an integer drawn from the discrete Gaussian with scale ``std / 2^k`` (Canonne, Kamath
    & Steinke 2020: exact rejection sampling with Bernoulli(exp(-x)) trials in rational arithmetic,
    no floating point) is added to the numerator exactly; the exact result is rounded once to the
    nearest float64 (post-processing). The float Gaussian is thus never computed in floating point.

    ``k``: None picks ``floor(log2(std)) - 52`` (grid ~2^-52 std; at least -1074), which is ~5x
    faster than OpenDP's exact default ``k=-1074`` (pass ``k=-1074`` for it). Rounding the inputs to
    that grid raises the L2 sensitivity by at most ``sqrt(n) 2^k``, which OpenDP's privacy map
    charges: for n = 421,834 and sensitivity = std its rho is 0.5000000000001442 instead of 0.5.
    Long vectors are cut into ``chunk`` pieces noised on ``workers`` threads (ctypes releases the
    GIL; each piece gets its own measurement); coordinate noise is i.i.d., so this changes nothing.
    """

    name = "opendp"
    secure = True

    def __init__(self, k: int | None = None, *, chunk: int = 32_768, workers: int | None = None):
        try:
            import opendp.prelude as dp
        except ImportError as e:
            raise OpenDPGaussianUnavailable(
                f"OpenDPGaussian needs the opendp package: pip install \"opendp>=0.12,<0.17\" ({e})"
            ) from e
        dp.enable_features("contrib")  # make_gaussian is contrib; floats need no other flag
        self._dp = dp
        self.k = k
        self.chunk = int(chunk)
        self.workers = max(1, workers or os.cpu_count() or 1)

    def grid_exponent(self, std: float) -> int:
        """The ``k`` of the noise grid ``2^k`` used for ``std``."""
        if self.k is not None:
            return int(self.k)
        return max(-1074, math.floor(math.log2(std)) - 52)

    def _noise_chunk(self, values: list[float], std: float, k: int) -> list[float]:
        dp = self._dp
        space = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=len(values)), dp.l2_distance(T=float)
        return dp.m.make_gaussian(*space, scale=std, k=k)(values)

    def add_noise(self, values: np.ndarray, std: float) -> np.ndarray:
        """``values`` + N(0, std^2) per coordinate, added exactly inside OpenDP (floating-point safe)."""
        std = _check_std(std)
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("values must be finite (OpenDP would clamp inf and zero NaN)")
        if std == 0 or values.size == 0:
            return values.copy()
        flat = values.ravel().tolist()
        k = self.grid_exponent(std)
        pieces = [flat[i : i + self.chunk] for i in range(0, len(flat), self.chunk)]
        if len(pieces) == 1 or self.workers == 1:
            noised = [self._noise_chunk(p, std, k) for p in pieces]
        else:
            with ThreadPoolExecutor(min(self.workers, len(pieces))) as pool:
                noised = list(pool.map(lambda p: self._noise_chunk(p, std, k), pieces))
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in noised]).reshape(values.shape)

    def sample(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """The mechanism run on a zero vector: the noise alone. Adding it to values yourself in
        float64 is outside OpenDP's proof; prefer :meth:`add_noise`."""
        return self.add_noise(np.zeros(tuple(shape)), std)

    def __repr__(self) -> str:
        return f"OpenDPGaussian(k={self.k}, chunk={self.chunk}, workers={self.workers})"


def make_gaussian_sampler(kind: str, seed: int | None = None) -> GaussianSampler:
    """``numpy`` (seeded when ``seed`` is given) or ``opendp`` (never seeded: ``seed`` must be None)."""
    if kind == "numpy":
        return NumpyGaussian(seed)
    if kind == "opendp":
        if seed is not None:
            raise ValueError("the opendp sampler draws from OpenSSL's CSPRNG and cannot be seeded; pass seed=None")
        return OpenDPGaussian()
    raise ValueError(f"unknown noise sampler {kind!r}; allowed: {', '.join(KINDS)}")
