"""Distributed DP's encoding: what each client does to its update before secure aggregation.

Kairouz, Liu & Steinke (ICML 2021) and Agarwal, Kairouz & Liu (NeurIPS 2021), with Skellam noise
(:mod:`fedpriv.privacy.skellam` says why). A client with update ``u`` (its model minus the global
model) and the round's public rotation seed:

1. clips ``u`` to L2 norm ``C`` (the user-level sensitivity in floats);
2. pads to ``d' = 2^ceil(log2 d)`` and rotates: ``x = H D u / sqrt(d')`` (``D`` random signs from the
   round's seed, ``H`` the Walsh-Hadamard matrix), which spreads the norm evenly over coordinates
   so that few bits carry the sum without overflow; the rotation is orthogonal (norm kept);
3. scales by ``gamma`` and rounds each coordinate stochastically to an integer, re-drawing until the
   rounded vector's norm is at most ``D2`` (conditional randomized rounding: the sensitivity
   bound is *enforced*, never only probable);
4. adds its share of Skellam noise, variance ``mu / (t - c)`` per coordinate, so that any ``t``
   survivors of whom ``c`` collude with the server still leave ``mu`` in the sum;
5. reduces modulo ``2^b``; secure aggregation (:mod:`fedpriv.secagg`) then reveals only the sum.

The server centres the decoded sum (``[-2^(b-1), 2^(b-1))``), divides by ``gamma`` and rotates back.
Wrap-around (a sum outside that range) only corrupts utility, never privacy (the server's view is a
function of the noised sum); :class:`DistributedPlan` picks ``gamma`` so that it has probability
below ``overflow_bound`` per round, and reports the quantisation's share of the error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import skellam

#: Standard deviations of the summed coordinate that must fit in half the modulus.
OVERFLOW_STDDEVS = 6.0
#: Conditional rounding's beta: the bound below is met by a single draw with probability >= 1 - beta.
ROUNDING_BETA = math.exp(-0.5)
MAX_ROUNDING_TRIES = 1000


def padded_dim(dim: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(dim, 1))))


def walsh_hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of a vector of length 2^k (its own inverse).
    Written here: numpy and scipy offer only the dense matrix (scipy.linalg.hadamard), O(d^2)."""
    y = np.array(x, dtype=np.float64, copy=True)
    n, h = y.shape[0], 1
    while h < n:
        y = y.reshape(-1, 2, h)
        y = np.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), axis=1)
        h *= 2
    return y.reshape(n) / math.sqrt(n)


def signs(seed: int, n: int) -> np.ndarray:
    """The round's random diagonal ``D`` (public: the server draws the seed and sends it)."""
    return np.random.default_rng(seed).integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0


def rotate(u: np.ndarray, seed: int) -> np.ndarray:
    n = padded_dim(u.size)
    x = np.zeros(n)
    x[: u.size] = u
    return walsh_hadamard(signs(seed, n) * x)


def unrotate(x: np.ndarray, seed: int, dim: int) -> np.ndarray:
    return (signs(seed, x.size) * walsh_hadamard(x))[:dim]


def rounded_l2_bound(scaled_norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """L2 bound that conditional randomized rounding enforces on a vector of norm ``scaled_norm``
    in ``dim`` coordinates (Kairouz, Liu & Steinke 2021, Sec. 4.1):
    ``sqrt(min(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2), (c + sqrt(d))^2))``."""
    c, d = scaled_norm, float(dim)
    return math.sqrt(min(c ** 2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2),
                         (c + math.sqrt(d)) ** 2))


@dataclass(frozen=True)
class DistributedPlan:
    """Every constant of the distributed mechanism for a run (the same in every round).

    Args (privacy meaning):
        dim: model parameters ``d`` that travel (``padded`` after the rotation).
        clip_norm: ``C``, the most one user's float update can weigh (user level, add/remove one user).
        bits: ``b``; every message and the sum live modulo ``2^b``.
        scale: ``gamma``, integers per unit of the rotated update.
        l2, l1: the integer-domain sensitivities the accountant uses (``l2`` enforced by rounding).
        variance: ``mu``, the Skellam variance per coordinate guaranteed in a released sum.
        min_survivors: ``t``; a round with fewer clients' vectors in the sum is dropped, never released.
        colluders: ``c``, clients that may collude with the server (their own noise does not count).
        max_clients: the most vectors a sum can hold (the overflow check's cohort).
    """

    dim: int
    padded: int
    clip_norm: float
    bits: int
    scale: float
    l2: float
    l1: float
    variance: float
    min_survivors: int
    colluders: int
    max_clients: int

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def client_variance(self) -> float:
        """Each client's Skellam share (variance per coordinate)."""
        return self.variance / (self.min_survivors - self.colluders)

    def sum_stddev(self, clients: int) -> float:
        """Standard deviation of one coordinate of a sum of ``clients`` vectors: the rotation spreads
        the sum's norm evenly, and that norm may be ``clients x gamma C`` (updates of a round point
        the same way: counting them as independent, sqrt(clients) x, let the sum wrap around),
        plus the noise and rounding of all of them."""
        return math.sqrt((clients * self.scale * self.clip_norm) ** 2 / self.padded
                         + clients * (self.client_variance + 0.25))

    def overflow_probability(self, clients: int | None = None) -> float:
        """Union bound over coordinates of a Gaussian tail beyond half the modulus (an estimate)."""
        z = (self.modulus / 2) / self.sum_stddev(clients or self.max_clients)
        return min(1.0, self.padded * math.erfc(z / math.sqrt(2)))

    def noise_stddev(self, survivors: int) -> float:
        """Float-domain noise std per coordinate of a sum of ``survivors`` vectors (noise + rounding)."""
        return math.sqrt(survivors * (self.client_variance + 0.25)) / self.scale

    def quantisation_share(self) -> float:
        """Fraction of the released sum's error variance that rounding adds (at the threshold)."""
        t = self.min_survivors
        return (t * 0.25) / (t * (self.client_variance + 0.25))

    def rounds(self, count: int, sample_rate: float = 1.0) -> list[skellam.SkellamRound]:
        return [skellam.SkellamRound(self.l2, self.l1, self.variance, sample_rate)] * count

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "modulus": self.modulus, "client_variance": self.client_variance,
                "overflow_probability": self.overflow_probability(),
                "quantisation_share": self.quantisation_share()}


def sensitivities(scale: float, clip_norm: float, padded: int) -> tuple[float, float]:
    """(L2, L1) of one user's encoded vector: the enforced rounding bound; for an integer vector
    ``||x||_1 <= min(||x||_2^2, sqrt(d) ||x||_2)``."""
    l2 = rounded_l2_bound(scale * clip_norm, padded)
    return l2, min(l2 ** 2, math.sqrt(padded) * l2)


def make_plan(*, dim: int, clip_norm: float, bits: int, target_epsilon: float, delta: float, rounds: int,
              sample_rate: float, min_survivors: int, colluders: int, max_clients: int,
              overflow_bound: float = 1e-6) -> DistributedPlan:
    """The largest ``gamma`` whose sum of ``max_clients`` vectors stays within ``2^b`` (overflow
    probability at most ``overflow_bound``), with the variance calibrated to ``target_epsilon``.
    Raises ValueError (the config turns it into one line) when nothing fits."""
    if min_survivors <= colluders:
        raise ValueError(f"min_survivors ({min_survivors}) must exceed the colluding clients ({colluders}): "
                         "their own noise shares do not protect anyone")
    padded = padded_dim(dim)

    def plan_for(scale: float) -> DistributedPlan:
        l2, l1 = sensitivities(scale, clip_norm, padded)
        mu = skellam.calibrate_variance(target_epsilon, delta, rounds, l2, l1, sample_rate)
        return DistributedPlan(dim, padded, clip_norm, bits, scale, l2, l1, mu, min_survivors, colluders, max_clients)

    lo, hi = 1e-3 / clip_norm, float(1 << bits) / clip_norm
    if plan_for(lo).overflow_probability() > overflow_bound:
        raise ValueError(f"{bits} bits cannot hold the sum of {max_clients} clients' noised vectors "
                         f"(clip {clip_norm:g}) without overflow at any scale: use more bits")
    for _ in range(12):  # bisection on log gamma (to ~1%); the noise scales with gamma, the rounding does not
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if plan_for(mid).overflow_probability() <= overflow_bound else (lo, mid)
    plan = plan_for(lo)
    if plan.quantisation_share() > 0.1:
        raise ValueError(f"{bits} bits leave rounding {plan.quantisation_share():.0%} of the noise for "
                         f"{max_clients} clients (clip {clip_norm:g}, {dim} parameters): use more bits")
    return plan


# ---------------------------------------------------------------------------------- the client


def quantise(update: np.ndarray, plan: DistributedPlan, rotation_seed: int, rng: np.random.Generator) -> np.ndarray:
    """Steps 1-3: clip to ``C``, rotate, scale by ``gamma``, round stochastically until the integer
    vector's norm is at most ``plan.l2`` (int64, not yet reduced)."""
    u = np.asarray(update, dtype=np.float64).ravel()
    if u.size != plan.dim:
        raise ValueError(f"update has {u.size} numbers, the plan {plan.dim}")
    norm = float(np.linalg.norm(u))
    if norm > plan.clip_norm:
        u = u * (plan.clip_norm / norm)
    x = rotate(u, rotation_seed) * plan.scale
    floor = np.floor(x)
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (rng.random(x.size) < (x - floor))
        if np.linalg.norm(rounded) <= plan.l2:
            return rounded.astype(np.int64)
    raise RuntimeError("conditional rounding did not meet its bound (the plan's l2 is too tight)")


def noise_share(plan: DistributedPlan, rng: np.random.Generator) -> np.ndarray:
    """Step 4: one client's Skellam share, Poisson(mu_c / 2) - Poisson(mu_c / 2) per coordinate."""
    half = plan.client_variance / 2
    return rng.poisson(half, plan.padded) - rng.poisson(half, plan.padded)


def encode(update: np.ndarray, plan: DistributedPlan, rotation_seed: int, rng: np.random.Generator) -> np.ndarray:
    """One client's vector for secure aggregation: quantised update plus its noise share, modulo
    ``2^b`` (int64 in ``[0, 2^b)``). ``rng`` must be unpredictable to the server (seeded from the
    operating system's CSPRNG): whoever predicts it can subtract the noise."""
    return np.mod(quantise(update, plan, rotation_seed, rng) + noise_share(plan, rng), plan.modulus)


# ---------------------------------------------------------------------------------- the server


def decode(total: np.ndarray, plan: DistributedPlan, rotation_seed: int) -> np.ndarray:
    """The noised float sum of the clients' clipped updates, from their vectors' sum modulo ``2^b``."""
    m = plan.modulus
    centred = np.mod(np.asarray(total, dtype=np.int64), m)
    centred = np.where(centred >= m // 2, centred - m, centred).astype(np.float64)
    return unrotate(centred / plan.scale, rotation_seed, plan.dim)
