"""Private selection: the exponential mechanism, run as report-noisy-max with Gumbel noise.

Choosing one of ``k`` candidates (a round's model, a configuration of a sweep) by scores computed on
private data leaks: the winner depends on the data. The exponential mechanism (McSherry & Talwar
2007) picks candidate ``i`` with probability proportional to ``exp(epsilon * u_i / (c * Delta))``,
where ``u_i`` is candidate i's score and ``Delta`` its sensitivity: the most any one privacy unit
(a client, under central DP) can move any one score. Adding independent Gumbel noise of scale
``c * Delta / epsilon`` to every score and reporting the index of the largest noisy score has
exactly this distribution (the Gumbel-max trick), so the two are the same mechanism.

The factor ``c``: ``c = 2`` in general; ``c = 1`` when the utilities are *monotone* -- for every pair
of neighbouring data sets, all scores move in the same direction (e.g. sums of non-negative per-unit
terms under add/remove-one: adding a unit can only raise, or only lower, every score). Then the
ratio of any candidate's probability changes by at most ``exp(epsilon)``, not ``exp(2 epsilon)``
(Dwork & Roth 2014, Section 3.4). The code uses ``c = 1`` only when the caller says ``monotone=True``,
and the caller must justify it (:mod:`fedpriv.selection` does so for its validation sums).

Sampler: OpenDP 0.16's ``make_noisy_max`` with the ``zero_concentrated_divergence`` measure adds
Gumbel noise, sampled exactly and compared in exact arithmetic (floating-point safe; random bits
from OpenSSL's CSPRNG). Its ``max_divergence`` variant adds *exponential* noise instead
(report-noisy-max with exponential noise = permute-and-flip, McKenna & Sheldon 2020): also
epsilon-DP, but its probabilities are not the softmax above, and it is not known to be
epsilon-bounded-range, so fedpriv uses the Gumbel form. OpenDP's own privacy map gives the Gumbel
mechanism's zCDP figure ``rho = epsilon^2 / 8`` (Cesar & Rogers 2021: the exponential mechanism is
epsilon-bounded-range, hence epsilon^2/8-zCDP); the pure epsilon is the closed form ``c * Delta / scale``,
and :func:`epsilon_of_scale` checks that the two agree before any draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Selection", "temperature_factor", "gumbel_scale", "epsilon_of_scale", "zcdp_rho",
           "selection_probabilities", "gumbel_noisy_max", "report_noisy_max"]

MECHANISM = "exponential mechanism (report-noisy-max with Gumbel noise, OpenDP make_noisy_max)"


@dataclass(frozen=True)
class Selection:
    """One private selection: the winner and what it cost.

    index: the position of the chosen candidate (the mechanism's output: publishable).
    epsilon: the pure epsilon-DP cost of this selection (delta = 0).
    rho: the same mechanism's zCDP figure from OpenDP's privacy map (epsilon^2 / 8).
    scale: the Gumbel noise scale added to each score (c * Delta / epsilon).
    sensitivity: Delta, the most one privacy unit moves any one score.
    monotone: whether the factor 2 was dropped (see the module docstring).
    candidates: how many candidates competed.
    """

    index: int
    epsilon: float
    rho: float
    scale: float
    sensitivity: float
    monotone: bool
    candidates: int

    def as_dict(self) -> dict:
        return {"index": self.index, "epsilon": self.epsilon, "zcdp_rho": self.rho, "gumbel_scale": self.scale,
                "sensitivity": self.sensitivity, "monotone": self.monotone, "candidates": self.candidates,
                "mechanism": MECHANISM}


def temperature_factor(monotone: bool) -> int:
    """``c`` in exp(epsilon u / (c Delta)): 1 for monotone utilities, 2 otherwise."""
    return 1 if monotone else 2


def _check(epsilon: float, sensitivity: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"selection epsilon must be finite and > 0, got {epsilon!r}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"selection sensitivity must be finite and > 0, got {sensitivity!r}")


def gumbel_scale(epsilon: float, sensitivity: float, monotone: bool) -> float:
    """The Gumbel scale that makes report-noisy-max ``epsilon``-DP.

    epsilon: the privacy cost of one selection (pure DP, delta 0).
    sensitivity: Delta, the largest change of any one score when one privacy unit changes.
    monotone: True only if every neighbouring change moves all scores the same way.
    """
    _check(epsilon, sensitivity)
    return temperature_factor(monotone) * sensitivity / epsilon


def gumbel_noisy_max(scale: float, monotone: bool):
    """OpenDP's report-noisy-max with Gumbel noise of ``scale``: a callable, scores -> winning index.

    monotone: declares the scores' neighbouring changes monotone (OpenDP's ``monotonic`` L-inf
    metric), which halves the privacy map. Call it many times to draw many selections.
    """
    import opendp.prelude as dp  # heavy (0.4 s, it loads its sklearn extras): only when a selection runs

    dp.enable_features("contrib")  # make_noisy_max is in OpenDP's contrib set
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.linf_distance(T=float, monotonic=monotone)
    return dp.m.make_noisy_max(*space, dp.zero_concentrated_divergence(), scale=float(scale))


def epsilon_of_scale(scale: float, sensitivity: float, monotone: bool) -> tuple[float, float]:
    """(epsilon, rho) of one Gumbel report-noisy-max at ``scale``.

    epsilon is the closed form c * Delta / scale (the exponential mechanism); rho is OpenDP's own
    privacy map of the measurement at input distance Delta. They must satisfy rho = epsilon^2 / 8
    (bounded range); a disagreement means the sampler does not do what this module says, and
    raises ``RuntimeError`` before anything is drawn.
    """
    epsilon = temperature_factor(monotone) * sensitivity / scale
    rho = float(gumbel_noisy_max(scale, monotone).map(float(sensitivity)))
    if not math.isclose(rho, zcdp_rho(epsilon), rel_tol=1e-9):
        raise RuntimeError(f"OpenDP's privacy map gives rho={rho}, the closed form {zcdp_rho(epsilon)}")
    return epsilon, rho


def zcdp_rho(epsilon: float) -> float:
    """zCDP of an epsilon-DP exponential mechanism: epsilon^2 / 8 (Cesar & Rogers 2021, bounded range)."""
    return epsilon * epsilon / 8.0


def selection_probabilities(scores: Sequence[float], epsilon: float, sensitivity: float,
                            monotone: bool) -> np.ndarray:
    """The closed form: softmax(epsilon * u / (c * Delta)); what :func:`report_noisy_max` samples."""
    u = np.asarray(scores, dtype=np.float64) / gumbel_scale(epsilon, sensitivity, monotone)
    w = np.exp(u - u.max())
    return w / w.sum()


def report_noisy_max(scores: Sequence[float], epsilon: float, sensitivity: float, *,
                     monotone: bool) -> Selection:
    """Choose one of ``scores``' candidates with the exponential mechanism; highest score is best.

    scores: one score per candidate, computed on private data (never published by this call).
    epsilon: the cost of this selection (pure DP); the caller records it in its ledger.
    sensitivity: Delta, the most one privacy unit moves any one score.
    monotone: see the module docstring; True halves the noise and needs a justification.
    Returns the :class:`Selection`; only its ``index`` (and the settings) may be published.
    """
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("report_noisy_max needs at least one candidate")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("selection scores must be finite")
    scale = gumbel_scale(epsilon, sensitivity, monotone)
    eps, rho = epsilon_of_scale(scale, sensitivity, monotone)
    index = int(gumbel_noisy_max(scale, monotone)(values))
    return Selection(index, eps, rho, scale, float(sensitivity), bool(monotone), len(values))
