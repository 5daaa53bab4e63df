"""The privacy of distributed DP's integer noise: the multi-dimensional Skellam mechanism.

Under ``privacy=distributed`` every client adds integer noise to its own integer-encoded update and
secure aggregation reveals only the sum modulo ``2^b``. Skellam noise (the difference of two
Poisson variables of mean ``mu / 2``, variance ``mu`` per coordinate) is chosen over the distributed
discrete Gaussian because a sum of independent Skellams *is* a Skellam: the survivors' shares add up
to exactly the noise the accountant assumes, with no extra divergence term for the sum (the
distributed discrete Gaussian's sum is only close to a discrete Gaussian; Kairouz, Liu & Steinke 2021).

* **One round** (Agarwal, Kairouz & Liu, NeurIPS 2021, "The Skellam Mechanism for Differentially
  Private Federated Learning", Theorem 3.5): for an integer order ``alpha > 1``, integer-domain L2 and
  L1 sensitivities ``D2``, ``D1`` and total variance ``mu`` per coordinate,
  ``eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))``.
  The neighbouring relation is add/remove one user (its whole encoded vector, norm at most ``D2``).
* **Poisson sampling** (only for an observer who does not know who took part): Steinke's bound for
  a Poisson-subsampled mechanism under add/remove (2022, arXiv:2210.00597), from the base
  mechanism's RDP at every integer order up to alpha. dp-accounting's RDP accountant has it only for
  the Gaussian, hence the hand-written sum (the tests check that with the Gaussian's RDP it equals
  dp-accounting's subsampled Gaussian, and that it bounds the exact subsampled Skellam divergence).
* **Composition** adds RDP over rounds; **conversion** to (epsilon, delta) is dp-accounting's
  (``rdp_privacy_accountant.compute_epsilon``).

Everything here is integer-domain: ``mu`` and the sensitivities are in the units of the encoded
integers (after scaling by ``gamma``), see :mod:`fedpriv.privacy.distributed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

from . import dp_accounting_lazy

#: Integer RDP orders (the Skellam bound and the subsampling bound hold at integer orders only).
SKELLAM_ORDERS = tuple(list(range(2, 65)) + [80, 96, 128, 160, 192, 256])


def skellam_rdp(order: int, l2: float, l1: float, variance: float) -> float:
    """RDP at integer ``order`` of the Skellam mechanism of per-coordinate ``variance`` (mu) for a
    shift of L2 norm at most ``l2`` and L1 norm at most ``l1`` (Agarwal et al. 2021, Thm 3.5)."""
    if order < 2 or int(order) != order:
        raise ValueError(f"the Skellam RDP bound holds at integer orders >= 2, got {order}")
    if variance <= 0:
        return math.inf
    a, mu = float(order), float(variance)
    return a * l2 ** 2 / (2 * mu) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))


def subsampled_rdp(order: int, q: float, base: Sequence[float]) -> float:
    """Upper bound on the RDP at integer ``order`` of a mechanism run on a Poisson(q) sample, under
    add/remove-one-user; ``base[j]`` bounds the base mechanism's RDP at order ``j`` (j = 2 .. order) in
    both directions (the Skellam's does: the noise is symmetric). Steinke 2022 ("Composition of
    Differential Privacy & Privacy Amplification by Subsampling", arXiv:2210.00597, its Renyi-DP bound
    for Poisson subsampling under add/remove):
    ``log((1-q)^(a-1) (1 + (a-1) q) + sum_{k=2}^{a} C(a,k) (1-q)^(a-k) q^k e^((k-1) eps(k))) / (a - 1)``,
    the binomial expansion of ``E[((1-q) + q L)^a]`` (exact for removal; addition is no worse), never
    above ``base[order]``. With the Gaussian's RDP it is exactly the subsampled Gaussian's RDP at
    integer orders (Mironov et al. 2019), which the tests check against dp-accounting. It replaced Zhu
    & Wang's general bound (ICML 2019, Thm 6, with a factor 3 on every term k >= 3), which needed 1.7x
    the noise std of central DP's PLD at the same epsilon on the quickstart cohort.
    """
    a = int(order)
    if q >= 1.0:
        return float(base[a])
    if q <= 0.0:
        return 0.0
    log_q, log_1q = math.log(q), math.log1p(-q)
    k = np.arange(2, a + 1, dtype=np.float64)
    log_binom = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
    higher = log_binom + k * log_q + (a - k) * log_1q + (k - 1) * np.asarray(base[2:a + 1])
    first = (a - 1) * log_1q + math.log1p((a - 1) * q)
    terms = np.concatenate([[first], higher])
    return float(min(logsumexp(terms) / (a - 1), base[a]))


@dataclass(frozen=True)
class SkellamRound:
    """One released round of the distributed mechanism (integer domain).

    Args (privacy meaning):
        l2, l1: the most one user's encoded vector can move the sum (add/remove one user), after
            scaling and conditional rounding (enforced, not probable).
        variance: the Skellam variance per coordinate that is *guaranteed* in the sum: the shares of
            the fewest survivors a release allows, minus the colluding clients' (who know their own).
        sample_rate: the Poisson rate of the round's cohort; 1.0 for an observer who knows the cohort.
    """

    l2: float
    l1: float
    variance: float
    sample_rate: float = 1.0


@lru_cache(maxsize=4096)
def round_rdp(r: SkellamRound) -> tuple[float, ...]:
    """The round's RDP at every order of :data:`SKELLAM_ORDERS`."""
    top = max(SKELLAM_ORDERS)
    base = [0.0, 0.0] + [skellam_rdp(j, r.l2, r.l1, r.variance) for j in range(2, top + 1)]
    if not all(math.isfinite(b) for b in base[2:]):
        return tuple(math.inf for _ in SKELLAM_ORDERS)
    return tuple(subsampled_rdp(a, r.sample_rate, base) for a in SKELLAM_ORDERS)


def epsilon(rounds: Sequence[SkellamRound], delta: float) -> float:
    """(epsilon at ``delta``) of the composition of ``rounds``, via RDP; 0 for no round."""
    if not rounds:
        return 0.0
    total = np.zeros(len(SKELLAM_ORDERS))
    for r in rounds:
        total += np.asarray(round_rdp(r))
    if not np.all(np.isfinite(total)):
        return math.inf
    eps, _ = dp_accounting_lazy.lib().rdp.compute_epsilon(SKELLAM_ORDERS, total, delta)
    return float(eps)


def calibrate_variance(target_epsilon: float, delta: float, rounds: int, l2: float, l1: float,
                       sample_rate: float = 1.0, rel_tol: float = 1e-4) -> float:
    """The smallest guaranteed variance ``mu`` per coordinate such that ``rounds`` rounds of
    sensitivity (``l2``, ``l1``) at ``sample_rate`` spend at most ``target_epsilon`` at ``delta``
    (bisection in log-space; the result is on the safe side)."""
    if target_epsilon <= 0 or rounds <= 0:
        raise ValueError("a positive target epsilon and at least one round are needed")

    def spent(mu: float) -> float:
        return epsilon([SkellamRound(l2, l1, mu, sample_rate)] * rounds, delta)

    lo, hi = 1e-6 * l2 ** 2, max(1.0, l2 ** 2)
    while spent(hi) > target_epsilon:
        lo, hi = hi, hi * 4
        if hi > 1e30 * max(1.0, l2 ** 2):
            raise ValueError(f"no Skellam variance reaches epsilon {target_epsilon} at delta {delta}")
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spent(mid) <= target_epsilon else (mid, hi)
    return hi
