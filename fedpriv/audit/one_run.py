"""Privacy auditing with one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv:2305.08846). ``m`` canaries are each included in the training input independently with
probability 1/2. After training the auditor scores every canary, guesses "in" for the ``k+``
highest scores and "out" for the ``k-`` lowest, and abstains on the rest: ``r = k+ + k-`` guesses,
``v`` of them correct.

If the algorithm is epsilon-DP with respect to each canary, the number of correct guesses is
stochastically dominated by ``Binomial(r, e^eps / (e^eps + 1))`` (their Theorem 3.1 / Prop. 5.1).
For (eps, delta)-DP the tail gets an additive delta term (their Theorem 5.2 and Algorithm 2, the
p-value computed here):

    p(eps, delta) = P[B >= v] + 2 m delta * max_{i = 1..v} P[v - i <= B < v] / i,
    B ~ Binomial(r, e^eps / (e^eps + 1)),

and any eps with ``p(eps, delta) < beta`` is rejected at level ``beta``. :func:`epsilon_lower_bound`
returns the supremum of the rejected eps (bisection; ``p`` increases with eps), an epsilon lower
bound at confidence ``1 - beta`` that needs only the inclusion bits to be independent fair coins:
no independence between canaries' scores is assumed (that is the point of the paper).

Guessing several ``(k+, k-)`` and keeping the best needs a correction: :func:`one_run_audit`
divides ``beta`` by the number of choices tried (Bonferroni).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats


def p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """Probability of ``>= v`` correct of ``r`` guesses among ``m`` canaries under (eps, delta)-DP."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    if epsilon < 0 or not (0 <= delta <= 1):
        raise ValueError("need epsilon >= 0 and delta in [0, 1]")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[B >= v]
    if delta > 0:
        # P[v - i <= B < v] for i = 1..v, divided by i; its maximum over i.
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
        ratio = np.cumsum(pmf) / np.arange(1, v + 1)
        tail += 2.0 * m * delta * float(ratio.max())
    return min(tail, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float, tol: float = 1e-6) -> float:
    """Largest eps that ``v`` correct of ``r`` guesses (``m`` canaries) reject at level ``beta``.

    Returns 0 when even eps = 0 is not rejected.
    """
    if not 0 < beta < 1:
        raise ValueError("beta (1 - confidence) must be in (0, 1)")
    if p_value(0.0, delta, m, r, v) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi, delta, m, r, v) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(mid, delta, m, r, v) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """A small grid of (k+, k-): 1%, 2%, 5%, 10%, 20% of the canaries guessed "in", none "out".

    Canaries that were inserted but never sampled look exactly like held-out ones, so the low
    scores are poor "out" guesses; the high scores are where a leak shows.
    """
    counts = sorted({max(1, int(round(f * m))) for f in (0.01, 0.02, 0.05, 0.1, 0.2)})
    return [(k, 0) for k in counts if k <= m]


def guesses(scores: Sequence[float], k_plus: int, k_minus: int) -> np.ndarray:
    """+1 for the k+ highest scores, -1 for the k- lowest, 0 (abstain) otherwise (ties by index)."""
    s = np.asarray(scores, dtype=np.float64)
    if k_plus + k_minus > s.size:
        raise ValueError("more guesses than canaries")
    order = np.argsort(-s, kind="stable")
    g = np.zeros(s.size, dtype=np.int8)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[s.size - k_minus :]] = -1
    return g


def one_run_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Steinke et al.'s lower bound from canary scores (higher = more likely included).

    Tries every ``(k+, k-)`` of ``guess_counts`` (default :func:`default_guess_counts`) at level
    ``(1 - confidence) / len(guess_counts)`` and reports the best bound, which then holds at
    ``confidence``.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    m = int(s.size)
    if m == 0:
        return {"epsilon": 0.0, "canaries": 0}
    grid = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    beta = (1.0 - confidence) / len(grid)
    truth = np.where(inc, 1, -1)
    best: dict[str, Any] = {"epsilon": 0.0}
    for k_plus, k_minus in grid:
        g = guesses(s, k_plus, k_minus)
        r = int(np.count_nonzero(g))
        v = int(np.sum(g == truth))
        eps = epsilon_lower_bound(m, r, v, delta, beta)
        if eps >= best["epsilon"] and ("k_plus" not in best or eps > best["epsilon"]):
            best = {"epsilon": eps, "k_plus": k_plus, "k_minus": k_minus, "guesses": r, "correct": v}
    best.update({"canaries": m, "included": int(inc.sum()), "confidence": confidence, "choices_tried": len(grid)})
    return best
