"""One-shot user-level privacy estimation from canary clients (Andrew et al., ICLR 2024).

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation for
Federated Learning" (ICLR 2024, arXiv:2302.03098). Canary clients whose update is a random unit
direction ``u`` (scaled to the clip norm) are inserted into the population; after training, the
auditor's statistic for a canary is the cosine of ``u`` with the final model delta (threat model
*final model*) or the maximum over rounds of the cosine with each round's released aggregate
(threat model *all rounds*). This module holds the statistics, all pure functions:

* :func:`one_shot_estimate` -- the paper's estimate: fit a Gaussian ``N(mu, sigma^2)`` to the
  inserted canaries' statistics, take the null ``N(mu0, sigma0^2)`` of a canary that was never
  inserted (exactly ``mean 0, variance 1/d`` for the final-model cosine, see
  :func:`cosine_null_logsf`; a Gaussian fit of the held-out canaries otherwise) and report the
  epsilon at which the two Gaussians are (epsilon, delta)-indistinguishable
  (:func:`gaussian_pair_epsilon`). An *estimate*, not a bound: it assumes Gaussian statistics and
  independent canaries (the paper proves it consistent for the Gaussian mechanism as d grows).
  With ``k`` inserted canaries the fitted std has relative error ``1/sqrt(2k)``, which the
  two-variance epsilon reads as leakage at small delta (an upward bias: about +10% at epsilon 7
  and k = 500, +0.3..0.8 at epsilon 0.2); ``epsilon_equal_variance``, the mu-GDP reading of the
  separation ``(mean - null_mean) / null_std``, is reported beside it and is far less variable.
* :func:`threshold_lower_bound` -- a conservative lower bound in the style of Jagielski, Ullman,
  Oprea (NeurIPS 2020) and Kairouz, Oh, Viswanath (ICML 2015): for a threshold ``tau``, (eps,
  delta)-DP forces ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``; with a
  Clopper-Pearson lower bound on TPR (inserted canaries) and an upper bound on FPR (the exact
  null law, and a Clopper-Pearson bound from held-out canaries), ``eps_lb = max_tau max(
  log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo)))``, Bonferroni over
  every interval of every threshold tried. Like Clopper-Pearson itself it treats the inserted
  canaries as independent trials (the one-shot assumption); :mod:`fedpriv.audit.one_run` gives a
  bound that needs no such assumption.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import special, stats

# log of a probability below which scipy's tails underflow; any smaller value is replaced by it,
# which keeps an *upper* bound on a false-positive rate valid.
_LOG_TINY = math.log(1e-300)


# ------------------------------------------------------------------------------ Gaussian privacy
def gaussian_mechanism_delta(epsilon: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity/noise ratio ``mu`` (mu-GDP).

    ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle & Wang, ICML 2018, Thm. 8;
    Dong, Roth & Su 2022, Cor. 2.13), evaluated in log space.
    """
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    if b >= a:
        return 0.0
    return float(math.exp(a) * -math.expm1(b - a))


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with ``gaussian_mechanism_delta(epsilon, mu) <= delta`` (bisection)."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    return _smallest_epsilon(lambda e: gaussian_mechanism_delta(e, mu), delta)


def _log_mass(region: list[tuple[float, float]], mean: float, std: float) -> float:
    """log P(X in union of disjoint intervals) for X ~ N(mean, std^2)."""
    logs = []
    for lo, hi in region:
        a, b = (lo - mean) / std, (hi - mean) / std
        if b <= a:
            continue
        if a > 0:  # both in the upper tail: use survival functions for precision
            la, lb = special.log_ndtr(-a), special.log_ndtr(-b)
        else:
            la, lb = special.log_ndtr(b), special.log_ndtr(a)
        if lb == -math.inf:
            logs.append(float(la))
        elif la > lb:
            logs.append(float(la + math.log(-math.expm1(lb - la))))
    if not logs:
        return -math.inf
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs))


def gaussian_pair_delta(epsilon: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """``sup_S P(S) - e^eps Q(S)`` for ``P = N(p[0], p[1]^2)``, ``Q = N(q[0], q[1]^2)``.

    The supremum is attained on ``S = {x : log p(x) - log q(x) > eps}``, the set where the quadratic
    ``a x^2 + b x + c`` below is positive (one half-line when the variances are equal, the outside
    or the inside of two roots otherwise).
    """
    (m1, s1), (m0, s0) = p, q
    if s1 <= 0 or s0 <= 0:
        raise ValueError("standard deviations must be > 0")
    a = 1 / (2 * s0**2) - 1 / (2 * s1**2)
    b = m1 / s1**2 - m0 / s0**2
    c = m0**2 / (2 * s0**2) - m1**2 / (2 * s1**2) + math.log(s0 / s1) - epsilon
    inf = math.inf
    if abs(a) < 1e-12 * max(1 / s0**2, 1 / s1**2):
        if b == 0:
            region = [(-inf, inf)] if c > 0 else []
        else:
            root = -c / b
            region = [(root, inf)] if b > 0 else [(-inf, root)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            region = [(-inf, inf)] if a > 0 else []
        else:
            r = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
            region = [(-inf, r[0]), (r[1], inf)] if a > 0 else [(r[0], r[1])]
    lp, lq = _log_mass(region, m1, s1), _log_mass(region, m0, s0)
    if lp == -inf:
        return 0.0
    lq_scaled = epsilon + lq
    if lq_scaled >= lp:
        return 0.0
    return float(math.exp(lp) * -math.expm1(lq_scaled - lp))


def gaussian_pair_epsilon(mu: float, sigma: float, mu0: float, sigma0: float, delta: float) -> float:
    """Epsilon at ``delta`` of distinguishing ``N(mu, sigma^2)`` from ``N(mu0, sigma0^2)``, both ways.

    ``max(eps_{P||Q}(delta), eps_{Q||P}(delta))``; equals :func:`gaussian_mechanism_epsilon` of
    ``|mu - mu0| / sigma`` when ``sigma == sigma0``. ``sigma == 0`` (a point mass against a
    density) is infinitely distinguishable.
    """
    if sigma0 <= 0:
        raise ValueError("the null's standard deviation must be > 0")
    if not (math.isfinite(mu) and math.isfinite(sigma)):
        return math.nan
    if sigma <= 0:
        return math.inf
    p, q = (mu, sigma), (mu0, sigma0)
    return max(
        _smallest_epsilon(lambda e: gaussian_pair_delta(e, p, q), delta),
        _smallest_epsilon(lambda e: gaussian_pair_delta(e, q, p), delta),
    )


def _smallest_epsilon(delta_of: Callable[[float], float], delta: float, tol: float = 1e-5) -> float:
    """Smallest eps >= 0 with ``delta_of(eps) <= delta`` for a non-increasing ``delta_of``."""
    if delta_of(0.0) <= delta:
        return 0.0
    hi = 1.0
    while delta_of(hi) > delta:
        hi *= 2
        if hi > 1e7:
            return math.inf
    lo = 0.0
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


# ------------------------------------------------------------------------------ the cosine null
def cosine_null_logsf(t: float | np.ndarray, dim: int) -> np.ndarray:
    """log P(cos(u, v) >= t) for ``u`` uniform on the unit sphere of R^dim and any fixed ``v``.

    The cosine has density proportional to ``(1 - t^2)^((dim - 3) / 2)`` on [-1, 1], i.e.
    ``(1 + cos) / 2 ~ Beta((dim - 1) / 2, (dim - 1) / 2)``: mean 0, variance exactly ``1 / dim``.
    Underflowing tails are replaced by log(1e-300), which keeps it an upper bound.
    """
    if dim < 2:
        raise ValueError("dimension must be >= 2")
    a = (dim - 1) / 2.0
    x = np.clip((1.0 + np.asarray(t, dtype=np.float64)) / 2.0, 0.0, 1.0)
    out = stats.beta.logsf(x, a, a)
    return np.maximum(np.nan_to_num(out, nan=0.0, neginf=_LOG_TINY), _LOG_TINY)


# ------------------------------------------------------------------------------ one-shot estimate
def one_shot_estimate(inserted: Sequence[float], delta: float, *, null_mean: float, null_std: float, null: str) -> dict[str, Any]:
    """Andrew et al.'s estimate: epsilon of ``N(mean, std^2)`` of the inserted canaries' statistics
    against the null ``N(null_mean, null_std^2)`` at ``delta``."""
    x = np.asarray(inserted, dtype=np.float64)
    if x.size < 2:
        return {"epsilon": math.nan, "reason": "fewer than 2 inserted canaries"}
    mu, sigma = float(x.mean()), float(x.std(ddof=1))
    eps = gaussian_pair_epsilon(mu, sigma, null_mean, null_std, delta)
    return {
        "epsilon": eps,
        # The mu-GDP reading, (mean - null mean) / null std, assumes equal variances: far less
        # variable with few canaries (the two-variance epsilon is sensitive to the fitted std).
        "epsilon_equal_variance": gaussian_mechanism_epsilon(abs(mu - null_mean) / null_std, delta),
        "mean": mu,
        "std": sigma,
        "null_mean": float(null_mean),
        "null_std": float(null_std),
        "null": null,
        "separation": (mu - null_mean) / null_std,  # in null standard deviations (the GDP mu when stds agree)
    }


# ------------------------------------------------------------------------------ lower bound
def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion."""
    if successes <= 0:
        return 0.0
    return float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper confidence bound on a binomial proportion."""
    if successes >= trials:
        return 1.0
    return float(stats.beta.isf(alpha, successes + 1, trials - successes))


def threshold_lower_bound(
    inserted: Sequence[float],
    held_out: Sequence[float],
    delta: float,
    alpha: float,
    *,
    null_log_fpr: Callable[[float], float] | None = None,
    max_thresholds: int = 64,
) -> dict[str, Any]:
    """A (1 - alpha) lower bound on epsilon from "statistic >= tau" tests (see the module doc).

    inserted / held_out: the statistic of canaries that were / were never inserted.
    null_log_fpr: optional exact (or upper-bounding) ``log P_null(stat >= tau)``; the FPR used is
        the smaller of it and the Clopper-Pearson upper bound from ``held_out``.
    Thresholds: up to ``max_thresholds`` quantiles of the inserted statistics; two one-sided
    intervals per threshold, each at ``alpha / (2 * thresholds)`` (Bonferroni), so that every
    interval holds simultaneously with probability >= 1 - alpha.
    """
    x = np.sort(np.asarray(inserted, dtype=np.float64))
    y = np.asarray(held_out, dtype=np.float64)
    k, kh = x.size, y.size
    if k == 0:
        return {"epsilon": 0.0, "thresholds": 0}
    cand = np.unique(x if k <= max_thresholds else np.quantile(x, np.linspace(0, 1, max_thresholds)))
    a = alpha / (2 * cand.size)
    best: dict[str, Any] = {"epsilon": 0.0, "threshold": None, "tpr_lo": None, "fpr_hi": None, "direction": None}
    for tau in cand:
        tp = int(np.sum(x >= tau))
        tpr_lo = clopper_pearson_lower(tp, k, a)
        log_fpr = 0.0
        if kh:
            log_fpr = math.log(max(clopper_pearson_upper(int(np.sum(y >= tau)), kh, a), 1e-300))
        if null_log_fpr is not None:
            log_fpr = min(log_fpr, float(null_log_fpr(float(tau))))
        fpr_hi = math.exp(log_fpr)
        cands = []
        if tpr_lo - delta > 0:
            cands.append((math.log(tpr_lo - delta) - log_fpr, "tpr/fpr"))
        if 1 - fpr_hi - delta > 0 and tpr_lo < 1:
            cands.append((math.log(1 - fpr_hi - delta) - math.log1p(-tpr_lo), "tnr/fnr"))
        for eps, direction in cands:
            if eps > best["epsilon"]:
                best = {"epsilon": eps, "threshold": float(tau), "tpr_lo": tpr_lo, "fpr_hi": fpr_hi, "direction": direction}
    best.update({"thresholds": int(cand.size), "alpha": alpha, "method": "clopper-pearson thresholds, Bonferroni"})
    return best
