"""Epsilon/delta of a sequence of releases, computed with dp-accounting.

Two accountants:

* "pld": privacy loss distributions (``dp_accounting.pld``), pessimistic
  rounding, so the figure is an upper bound on the true epsilon. It supports
  Poisson sampling and no sampling ("all") under add/remove-one, not
  fixed-size sampling without replacement.
* "rdp": Renyi DP (``dp_accounting.rdp``) on :data:`RDP_ORDERS`; supports all
  three kinds of sampling. Also an upper bound, usually looser than PLD.

"fixed" releases are accounted under replace-one (the only relation
dp-accounting supports for sampling without replacement). Replacing a unit
moves a sum of clipped contributions by up to twice the clipping norm, so the
ledger's noise multiplier (relative to one unit's norm bound) is halved before
it is handed to dp-accounting. "all" releases in such a ledger are halved too.

Pure releases (Laplace; any epsilon-DP mechanism via the randomized-response pair) compose
with the Gaussian ones in the same PLD/RDP; at delta 0 their epsilon is the exact sum (a
Gaussian makes it inf). They claim no amplification even on a round's sampled cohort: per
rest-of-sample T, the joint pair's likelihood ratio (1-q) + q g l is, for each Gaussian
output, a contraction towards its mean of ((1-q) + q g) l, the ratio of "amplified Gaussian
x unamplified Laplace", so by Jensen every hockey-stick divergence (either direction) of the
joint is at most that of the composition the ledger computes.

Everything here is a pure function of a tuple of releases, so results are
cached: copies of a ledger and the schedule calibrator share the caches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

if TYPE_CHECKING:
    from dp_accounting import dp_event

from .dp_accounting_lazy import lib as _dpa
from .releases import REPLACE_ONE, DpRelease, merge, neighboring_relation

#: PLD discretisation of the privacy loss. 1e-3 is within 0.01% of 1e-4 on
#: the reference cases and ~10x faster (1e-2: up to 0.4% looser); pessimistic
#: rounding keeps it an upper bound either way.
DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-3

#: RDP orders: dp-accounting's default grid (1.1 to 10.9 in steps of 0.1,
#: integers to 63, 128 ... 1024) plus a few more large orders for small
#: epsilons. Fractional orders near 1 matter for large epsilons. Each distinct
#: release costs ~0.1-0.3 s (Poisson) to ~1 s (fixed) of CPU once; cached.
RDP_ORDERS = tuple(sorted(
    [1.0 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
    + [64.0, 80.0, 96.0, 128.0, 256.0, 320.0, 384.0, 512.0, 768.0, 1024.0]))

ACCOUNTANTS = ("pld", "rdp")


# --------------------------------------------------------------------------
# Which accountant applies


def pld_supported(releases: Sequence[DpRelease]) -> bool:
    """PLD in dp-accounting has no fixed-size-sampling (without replacement)."""
    return all(r.sampling != "fixed" for r in releases)


def reported_accountant(releases: Sequence[DpRelease]) -> str:
    """The accountant whose figure is reported: PLD where supported, else RDP."""
    return "pld" if pld_supported(releases) else "rdp"


def _effective_noise(r: DpRelease, relation: str) -> float:
    """Noise relative to the sensitivity under ``relation`` (see module doc)."""
    return r.noise_multiplier / 2.0 if relation == REPLACE_ONE else r.noise_multiplier


def _rr_noise_parameter(epsilon: float) -> float:
    """Randomized response over 2 buckets answers truthfully with probability e^eps / (1 + e^eps):
    dp-accounting's noise parameter p (uniform answer with probability p) is 2 / (1 + e^eps).
    Kairouz, Oh & Viswanath (2015, Thm 2.1): this pair (Bernoulli(e^eps/(1+e^eps)) vs
    Bernoulli(1/(1+e^eps))) dominates every (eps, 0)-DP mechanism, so composing it is a valid
    (and, for k-fold composition, the optimal) bound for any epsilon-DP release (the exponential
    mechanism included) whatever its output space."""
    return 2.0 / (1.0 + math.exp(epsilon))


def pure_epsilon_sum(releases: Sequence[DpRelease]) -> float:
    """Epsilon at delta 0: the sum over pure releases; inf if a Gaussian release touched data."""
    releases = _accountable(releases)
    if any(not r.is_pure for r in releases):
        return math.inf
    replace_one = neighboring_relation(releases) == REPLACE_ONE
    return float(sum(r.count * r.standalone_epsilon(replace_one) for r in releases))


def _accountable(releases: Sequence[DpRelease]) -> tuple[DpRelease, ...]:
    """Drop releases that touch nobody, merge what becomes adjacent."""
    return tuple(merge(r for r in releases if not r.is_free))


# --------------------------------------------------------------------------
# RDP


class _DropConvergenceWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_dp_accounting():
    """dp-accounting logs (through absl) each fractional RDP order whose
    series does not converge; it then drops that order, which is safe. Hide
    those lines while we compute, without changing logging for anyone else."""
    logger = logging.getLogger("absl")
    f = _DropConvergenceWarnings()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def release_dp_event(r: DpRelease, relation: str) -> dp_event.DpEvent:
    """One Gaussian or Laplace release (count 1) as a dp-accounting event under ``relation``."""
    events = _dpa().event
    if r.kind == "laplace":
        return events.LaplaceDpEvent(_effective_noise(r, relation))
    gaussian = events.GaussianDpEvent(_effective_noise(r, relation))
    if r.sampling == "poisson":
        return events.PoissonSampledDpEvent(r.sampling_rate, gaussian)
    if r.sampling == "fixed":
        return events.SampledWithoutReplacementDpEvent(
            r.population, r.sample_size, gaussian)
    return gaussian


def _event_rdp(release: DpRelease, relation: str, orders: tuple[float, ...]) -> np.ndarray:
    """RDP at ``orders`` of ONE release (count ignored)."""
    if release.kind == "pure":
        # The randomized-response pair is symmetric, so its RDP is the same under either
        # relation; dp-accounting only accepts it under replace-one (the epsilon doubles for a
        # replace-one ledger: group privacy of size 2).
        eps = release.standalone_epsilon(relation == REPLACE_ONE)
        acc = _dpa().rdp.RdpAccountant(orders=list(orders), neighboring_relation=_dpa().relations[REPLACE_ONE])
        event = _dpa().event.RandomizedResponseDpEvent(_rr_noise_parameter(eps), 2)
    else:
        acc = _dpa().rdp.RdpAccountant(orders=list(orders), neighboring_relation=_dpa().relations[relation])
        event = release_dp_event(release, relation)
    with _quiet_dp_accounting():
        acc.compose(event)
    return np.array(acc.rdp, dtype=np.float64)


@lru_cache(maxsize=4096)
def _rdp_curve(release: DpRelease, relation: str) -> np.ndarray:
    """RDP at :data:`RDP_ORDERS` of ONE release like ``release`` (its count is ignored)."""
    curve = _event_rdp(release, relation, RDP_ORDERS)
    curve.setflags(write=False)
    return curve


def _one(r: DpRelease) -> DpRelease:
    return r if r.count == 1 else replace(r, count=1)


def _rdp_total(releases: tuple[DpRelease, ...]) -> np.ndarray:
    relation = neighboring_relation(releases)
    total = np.zeros(len(RDP_ORDERS))
    for r in releases:
        total = total + r.count * _rdp_curve(_one(r), relation)
    return total


# --------------------------------------------------------------------------
# PLD


@lru_cache(maxsize=256)
def _pld_one(noise_multiplier: float, sampling_rate: float, vdi: float):
    """PLD of one Poisson-subsampled Gaussian release (add/remove-one)."""
    return _dpa().pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sampling_rate,
        value_discretization_interval=vdi, pessimistic_estimate=True)


@lru_cache(maxsize=16)
def _pld_term(r: DpRelease, vdi: float):
    """PLD of ``r.count`` compositions of release ``r``."""
    if r.kind == "laplace":
        return _dpa().pld.from_laplace_mechanism(
            parameter=r.noise_multiplier, value_discretization_interval=vdi,
            pessimistic_estimate=True).self_compose(r.count)
    if r.kind == "pure":  # the dominating randomized-response pair (see _rr_noise_parameter)
        return _dpa().pld.from_randomized_response(
            noise_parameter=_rr_noise_parameter(r.standalone_epsilon()), num_buckets=2,
            value_discretization_interval=vdi, pessimistic_estimate=True).self_compose(r.count)
    if r.sampling == "all":
        # Composing k Gaussians of std z is one Gaussian of std z/sqrt(k).
        return _dpa().pld.from_gaussian_mechanism(
            standard_deviation=r.noise_multiplier / math.sqrt(r.count),
            value_discretization_interval=vdi, pessimistic_estimate=True)
    return _pld_one(r.noise_multiplier, r.sampling_rate, vdi).self_compose(r.count)


_FOLDS: OrderedDict = OrderedDict()
_FOLDS_MAX = 16
_FOLDS_LOCK = threading.RLock()


def _remember(key, value) -> None:
    _FOLDS[key] = value
    _FOLDS.move_to_end(key)
    while len(_FOLDS) > _FOLDS_MAX:
        _FOLDS.popitem(last=False)


def _pld_fold(releases: tuple[DpRelease, ...], vdi: float):
    """PLD of the composition, folded left to right.

    The fold of ``releases[:-1]`` is kept, so a ledger that grows by one
    release (or whose last release's count grows) costs one composition per
    round; the arithmetic is the same as a fold from scratch, so a result never
    depends on what happened to be cached.
    """
    with _FOLDS_LOCK:
        return _pld_fold_locked(releases, vdi)


def _pld_fold_locked(releases: tuple[DpRelease, ...], vdi: float):
    key = (releases, vdi)
    if key in _FOLDS:
        _FOLDS.move_to_end(key)
        return _FOLDS[key]
    head = (releases[:-1], vdi)
    if len(releases) == 1:
        pld = _pld_term(releases[0], vdi)
    else:
        if head in _FOLDS:
            prefix = _FOLDS[head]
        else:
            prefix = _pld_term(releases[0], vdi)
            for r in releases[1:-1]:
                prefix = prefix.compose(_pld_term(r, vdi))
        _remember(head, prefix)
        pld = prefix.compose(_pld_term(releases[-1], vdi))
    _remember(key, pld)
    return pld


# --------------------------------------------------------------------------
# Public functions


def _check_accountant(releases: tuple[DpRelease, ...], accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if accountant == "pld" and not pld_supported(releases):
        raise ValueError("PLD does not support sampling='fixed' (without replacement): "
                         "use accountant='rdp'")


@lru_cache(maxsize=1024)
def epsilon(releases: tuple[DpRelease, ...], delta: float, accountant: str,
            vdi: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> float:
    """Epsilon at ``delta`` of the composition of ``releases`` (delta 0: pure releases only)."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    _check_accountant(releases, accountant)
    releases = _accountable(releases)
    if not releases:
        return 0.0
    if any(r.is_non_private for r in releases):
        return math.inf
    if delta == 0.0:
        return pure_epsilon_sum(releases)
    if accountant == "rdp":
        eps, _ = _dpa().rdp.compute_epsilon(RDP_ORDERS, _rdp_total(releases), delta)
        return float(eps)
    return float(_pld_fold(releases, vdi).get_epsilon_for_delta(delta))


@lru_cache(maxsize=256)
def delta(releases: tuple[DpRelease, ...], epsilon: float, accountant: str,
          vdi: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> float:
    """Smallest delta the accountant proves for ``epsilon``."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    _check_accountant(releases, accountant)
    releases = _accountable(releases)
    if not releases:
        return 0.0
    if any(r.is_non_private for r in releases):
        return 1.0
    if accountant == "rdp":
        d, _ = _dpa().rdp.compute_delta(RDP_ORDERS, _rdp_total(releases), epsilon)
        return float(d)
    return float(min(1.0, _pld_fold(releases, vdi).get_delta_for_epsilon(epsilon)))


def epsilons_by_round(rounds: Sequence[DpRelease], delta: float, accountant: str,
                      vdi: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
                      evaluate: Sequence[int] | None = None) -> list[float]:
    """Epsilon after each round, one release per round (its count = steps).

    Composes round by round (one composition per round instead of a fresh
    fold each time), so the figures equal :func:`epsilon` of the merged
    releases up to floating-point error. ``evaluate``: 1-based rounds to
    report (default all); the composition still covers every round.
    """
    rounds = tuple(rounds)
    _check_accountant(rounds, accountant)
    wanted = set(range(1, len(rounds) + 1) if evaluate is None else evaluate)
    relation = neighboring_relation(rounds)
    out: dict[int, float] = {}
    running = None
    non_private = False
    for t, r in enumerate(rounds, start=1):
        if not r.is_free:
            if r.is_non_private:
                non_private = True
            elif accountant == "rdp":
                step = r.count * _rdp_curve(_one(r), relation)
                running = step if running is None else running + step
            else:
                term = _pld_term(r, vdi)
                running = term if running is None else running.compose(term)
        if t not in wanted:
            continue
        if non_private:
            out[t] = math.inf
        elif running is None:
            out[t] = 0.0
        elif accountant == "rdp":
            out[t] = float(_dpa().rdp.compute_epsilon(RDP_ORDERS, running, delta)[0])
        else:
            out[t] = float(running.get_epsilon_for_delta(delta))
    return [out[t] for t in (sorted(wanted) if evaluate is None else evaluate)]


# --------------------------------------------------------------------------
# Fast estimate for planning (not a reported figure)

_ESTIMATE_ORDERS = np.array([float(a) for a in range(2, 33)]
                            + [40, 48, 56, 64, 80, 96, 128, 160, 192, 256])
_K = np.arange(_ESTIMATE_ORDERS.max() + 1)
_LOG_BINOM = np.where(
    _K[None, :] <= _ESTIMATE_ORDERS[:, None],
    gammaln(_ESTIMATE_ORDERS[:, None] + 1) - gammaln(_K[None, :] + 1)
    - gammaln(np.maximum(_ESTIMATE_ORDERS[:, None] - _K[None, :], 0) + 1),
    -np.inf)


def _estimate_curve(z: float, q: float) -> np.ndarray:
    """RDP of the Poisson-subsampled Gaussian at integer orders a:
    log(sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 z^2))) / (a-1)."""
    a = _ESTIMATE_ORDERS
    if q == 1.0:
        return a / (2 * z * z)
    k = _K[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (_LOG_BINOM + (a[:, None] - k) * math.log1p(-q) + k * math.log(q)
                 + (k * k - k) / (2 * z * z))
    return logsumexp(terms, axis=1) / (a - 1)


def estimate_epsilon(releases: Sequence[DpRelease], delta: float) -> float:
    """Cheap, vectorised RDP estimate used to bracket calibrations.

    Fixed-size sampling is estimated as Poisson sampling at the same rate. The
    result steers a search; only :func:`epsilon` is ever reported.
    """
    releases = _accountable(releases)
    if not releases:
        return 0.0
    if any(r.is_non_private for r in releases):
        return math.inf
    relation = neighboring_relation(releases)
    total = np.zeros(len(_ESTIMATE_ORDERS))
    for r in releases:
        if r.kind != "gaussian":
            total += r.count * _event_rdp(r, relation, tuple(_ESTIMATE_ORDERS))
            continue
        total += r.count * _estimate_curve(_effective_noise(r, relation), r.sampling_rate)
    eps, _ = _dpa().rdp.compute_epsilon(_ESTIMATE_ORDERS, total, delta)
    return float(eps)
