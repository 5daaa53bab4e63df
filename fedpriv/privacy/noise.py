"""Noise of adaptive clipping (Andrew et al., 2021, "Differentially Private
Learning with Adaptive Clipping").

Each round releases two Gaussian sums over the same sampled units:

* the clipped updates, noise ``z_update * C`` for sensitivity ``C``;
* the clipped-count: each unit contributes ``b_i - 1/2`` (b_i = 1 if its update
  was not clipped), so the sensitivity is ``1/2``; noise std ``sigma_b``.

Releasing Gaussians with sensitivities ``s_j`` and noise stds ``n_j`` on the
same data is one Gaussian mechanism whose noise multiplier ``z`` satisfies
``1/z^2 = sum_j (s_j/n_j)^2``. Here ``1/z_total^2 = 1/z_update^2 + 1/(2 sigma_b)^2``.
Record ``z_total`` in the ledger.
"""

from __future__ import annotations

import math


def _check(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def total_noise_multiplier(z_update: float, sigma_b: float) -> float:
    """Noise multiplier of the joint release (update + clipped-count).

    z_update: noise std of the update sum / clipping norm.
    sigma_b: noise std of the centred clipped-count sum (sensitivity 1/2);
        ``inf`` means no count is released.
    """
    z_update, sigma_b = _check("z_update", z_update), _check("sigma_b", sigma_b)
    if z_update == 0 or sigma_b == 0:
        return 0.0
    inv_sq = 1.0 / z_update**2 + 1.0 / (2.0 * sigma_b) ** 2
    return math.inf if inv_sq == 0 else 1.0 / math.sqrt(inv_sq)


def update_noise_for_total(z_total: float, sigma_b: float) -> float:
    """Update noise multiplier that makes the joint release cost ``z_total``.

    ``z_update = (z_total^-2 - (2 sigma_b)^-2)^(-1/2)``; it is larger than
    ``z_total`` because the clipped-count spends part of the budget.
    Raises ``ValueError`` if ``2 * sigma_b <= z_total`` (the count alone
    would already cost more than the whole budget).
    """
    z_total, sigma_b = _check("z_total", z_total), _check("sigma_b", sigma_b)
    if z_total == 0:
        return 0.0
    if 2.0 * sigma_b <= z_total:
        raise ValueError(f"sigma_b={sigma_b:g} too small for z_total={z_total:g}: "
                         f"need sigma_b > z_total/2 = {z_total / 2:g}")
    inv_sq = 1.0 / z_total**2 - 1.0 / (2.0 * sigma_b) ** 2
    return 1.0 / math.sqrt(inv_sq)


#: Alias: the noise multiplier to record for an adaptive-clipping round.
effective_noise_multiplier = total_noise_multiplier
