"""The Laplace mechanism for federated analytics: noise a vector of bounded sums, record the release.

Counts and bounded sums get Laplace noise (pure epsilon-DP, calibrated to the L1 sensitivity);
model updates get Gaussian noise (approximate DP, calibrated to the L2 sensitivity): see the README.

Two samplers, as for the Gaussian (:mod:`fedpriv.privacy.noise_samplers`):

* ``opendp`` (any run with ``privacy.secure_rng=true``): OpenDP's ``make_laplace`` over
  ``vector_domain(atom_domain(T=float, nan=False))`` with ``l1_distance``. Internally a discrete
  Laplace on a 2^k grid added exactly and rounded once (floating-point safe, Canonne, Kamath &
  Steinke 2020), random bits from OpenSSL's CSPRNG; OpenDP's own privacy map is checked against
  the ledger's epsilon before anything is drawn.
* ``numpy`` seeded (``privacy.secure_rng=false``): ``Generator.laplace``, reproducible, NOT for
  release.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .ledger import PrivacyLedger

__all__ = ["LaplaceMechanism", "laplace_scale"]


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """The scale b giving epsilon = sensitivity / b (the Laplace mechanism's calibration)."""
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be finite and > 0, got {sensitivity!r}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    return sensitivity / epsilon


class LaplaceMechanism:
    """Adds Laplace noise to a vector of sums and records the release in a ledger.

    Args (privacy meaning):
        secure: True draws with OpenDP (CSPRNG, floating-point safe: for a release); False draws
            from numpy seeded with ``seed`` (reproducible research runs, NOT for release).
        seed: the seed of the numpy streams (only when ``secure`` is False).
    """

    def __init__(self, *, secure: bool = True, seed: int | None = None):
        self.secure = bool(secure)
        if self.secure:
            import opendp.prelude as dp  # an optional, heavy dependency: loaded only when used

            dp.enable_features("contrib")
            self._dp = dp
        else:
            self._dp = None
            self._seed = 0 if seed is None else int(seed)

    def release(self, values: Sequence[float], *, sensitivity: float, epsilon: float, ledger: PrivacyLedger,
                label: str, stream: int = 0) -> np.ndarray:
        """``values`` + Laplace(b) per coordinate, b = sensitivity / epsilon; recorded in ``ledger``
        FIRST (before the noisy values exist).

        sensitivity: the L1 norm by which adding or removing one privacy unit can move ``values``.
        epsilon: the release's pure-DP epsilon (delta 0).
        label: what privacy.json calls this release.
        stream: (seeded runs only) which numpy stream draws it, e.g. the round: a resumed research
            run redraws the same noise without any generator state being saved.
        """
        values = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise ValueError("values must be finite")
        b = laplace_scale(sensitivity, epsilon)
        ledger.record_laplace(b / sensitivity, label=label, sensitivity=float(sensitivity), scale=b)
        if self._dp is None:
            rng = np.random.default_rng([self._seed, int(stream)])
            return values + rng.laplace(0.0, b, size=values.shape)
        dp = self._dp
        space = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=len(values)), dp.l1_distance(T=float)
        meas = dp.m.make_laplace(*space, scale=b)
        opendp_eps = float(meas.map(float(sensitivity)))
        if opendp_eps > epsilon * (1 + 1e-9):  # OpenDP charges the grid rounding: never more than we record
            raise ValueError(f"OpenDP's privacy map gives epsilon {opendp_eps} > {epsilon} recorded")
        return np.asarray(meas(values.tolist()), dtype=np.float64)

    def words(self) -> str:
        """Where the noise comes from, for privacy.json."""
        if self.secure:
            return ("OpenDP make_laplace (vector, L1): exact discrete Laplace on a 2^k grid added in exact arithmetic, "
                    "rounded once to float64; random bits from OpenSSL's CSPRNG; floating-point safe")
        return "numpy Generator.laplace on PCG64 seeded from the run's seed: reproducible, NOT for release"
