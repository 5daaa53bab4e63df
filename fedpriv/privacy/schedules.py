"""Noise-multiplier schedules over rounds 1..T, and their calibration.

A schedule is a *shape* (a relative value per round) times a *scale*. Give
the noise multipliers directly (``NoiseSchedule(shape, T, scale=1.0)``; then
the shape's values are the noise multipliers), or let :func:`calibrate` find
the scale at which the ledger's reported epsilon after round T lands in
``[(1 - tolerance) * target, target]``.

One round adds ``steps_per_round`` releases with that round's noise
multiplier (1 for central DP; the number of DP-SGD steps for local DP).

Cost: every distinct noise value is one more PLD/RDP computation, so the
smooth shapes (linear, cosine) are held constant over ``levels`` equal blocks
of rounds (default 10); ``levels=T`` gives one value per round, at a cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from . import accounting
from .accounting import DEFAULT_VALUE_DISCRETIZATION_INTERVAL
from .ledger import PrivacyLedger
from .releases import DpRelease, make_release, merge

__all__ = ["Shape", "Constant", "Linear", "Cosine", "Step", "Phases", "NoiseSchedule",
           "constant", "linear", "cosine", "step", "phases", "calibrate",
           "planned_epsilons", "planned_ledger"]

#: Calibration never goes outside these noise multipliers.
MIN_NOISE_MULTIPLIER = 1e-2
MAX_NOISE_MULTIPLIER = 1e4
_COARSE_VDI = 1e-2  # PLD discretisation for the early calibration steps


# ----------------------------------------------------------------------------- shapes


class Shape:
    """Relative noise multiplier per round (positive, finite)."""

    def values(self, num_rounds: int) -> tuple[float, ...]:
        raise NotImplementedError


def _blocks(num_rounds: int, levels: int) -> list[float]:
    """Position in [0, 1] of each round's block; ``levels`` equal blocks."""
    levels = min(levels, num_rounds)
    if levels == 1:
        return [0.0] * num_rounds
    return [((t * levels) // num_rounds) / (levels - 1) for t in range(num_rounds)]


@dataclass(frozen=True)
class Constant(Shape):
    value: float = 1.0

    def values(self, num_rounds: int) -> tuple[float, ...]:
        return (float(self.value),) * num_rounds


@dataclass(frozen=True)
class Linear(Shape):
    """From ``start`` (first block) to ``end`` (last block), linearly."""
    start: float = 1.0
    end: float = 1.0
    levels: int = 10

    def values(self, num_rounds: int) -> tuple[float, ...]:
        return tuple(self.start + (self.end - self.start) * u
                     for u in _blocks(num_rounds, self.levels))


@dataclass(frozen=True)
class Cosine(Shape):
    """From ``start`` to ``end`` along half a cosine (flat at both ends)."""
    start: float = 1.0
    end: float = 1.0
    levels: int = 10

    def values(self, num_rounds: int) -> tuple[float, ...]:
        return tuple(self.end + (self.start - self.end) * (1 + math.cos(math.pi * u)) / 2
                     for u in _blocks(num_rounds, self.levels))


@dataclass(frozen=True)
class Step(Shape):
    """``start``, multiplied by ``gamma`` every ``every`` rounds."""
    gamma: float = 0.5
    every: int = 1
    start: float = 1.0

    def values(self, num_rounds: int) -> tuple[float, ...]:
        return tuple(self.start * self.gamma ** (t // self.every) for t in range(num_rounds))


@dataclass(frozen=True)
class Phases(Shape):
    """Explicit ``((rounds, value), ...)``; the rounds must add up to T."""
    phases: tuple[tuple[int, float], ...] = ()

    def values(self, num_rounds: int) -> tuple[float, ...]:
        total = sum(n for n, _ in self.phases)
        if total != num_rounds:
            raise ValueError(f"phases cover {total} rounds, schedule has {num_rounds}")
        return tuple(float(v) for n, v in self.phases for _ in range(n))


def constant(value: float = 1.0) -> Constant:
    """The same noise every round."""
    return Constant(value)


def linear(start: float = 1.0, end: float = 0.5, levels: int = 10) -> Linear:
    """``start`` -> ``end`` linearly, in ``levels`` constant blocks of rounds."""
    return Linear(start, end, _positive_int("levels", levels))


def cosine(start: float = 1.0, end: float = 0.5, levels: int = 10) -> Cosine:
    """``start`` -> ``end`` along half a cosine, in ``levels`` blocks."""
    return Cosine(start, end, _positive_int("levels", levels))


def step(gamma: float, every: int, start: float = 1.0) -> Step:
    """``start * gamma**k`` in the k-th block of ``every`` rounds (k from 0)."""
    return Step(gamma, _positive_int("every", every), start)


def phases(spec: Sequence[tuple[int, float]]) -> Phases:
    """Explicit phases: ``[(rounds, value), ...]`` covering all T rounds."""
    spec = tuple((_positive_int("phase rounds", n), float(v)) for n, v in spec)
    if not spec:
        raise ValueError("phases needs at least one (rounds, value) pair")
    return Phases(spec)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class NoiseSchedule:
    """Noise multiplier of round t (1-based) = ``scale * shape.values(T)[t-1]``."""
    shape: Shape
    num_rounds: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        _positive_int("num_rounds", self.num_rounds)
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, got {self.scale!r}")
        for v in self.shape.values(self.num_rounds):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"shape values must be positive and finite, got {v!r}")

    def noise_multipliers(self) -> list[float]:
        return [self.scale * v for v in self.shape.values(self.num_rounds)]

    def noise_multiplier(self, round: int) -> float:
        if not 1 <= round <= self.num_rounds:
            raise ValueError(f"round must be in 1..{self.num_rounds}, got {round}")
        return self.noise_multipliers()[round - 1]


def planned_ledger(schedule: NoiseSchedule, sampling_rate: float, sampling: str, *,
                   steps_per_round: int = 1, population: int | None = None,
                   sample_size: int | None = None, rounds: int | None = None,
                   value_discretization_interval: float =
                   DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> PrivacyLedger:
    """The ledger a run following ``schedule`` holds after ``rounds`` rounds
    (default: all). Arguments mean the same as in :meth:`PrivacyLedger.record`."""
    rounds = schedule.num_rounds if rounds is None else rounds
    ledger = PrivacyLedger(value_discretization_interval=value_discretization_interval)
    for z in schedule.noise_multipliers()[:rounds]:
        ledger.record(z, sampling_rate, sampling, steps_per_round, population, sample_size)
    return ledger


def planned_epsilons(schedule: NoiseSchedule, sampling_rate: float, sampling: str,
                     delta: float, *, steps_per_round: int = 1,
                     population: int | None = None, sample_size: int | None = None,
                     accountant: str | None = None, rounds: Sequence[int] | None = None,
                     value_discretization_interval: float =
                     DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> list[float]:
    """Epsilon after each round if the run follows ``schedule``: the figure the
    run's ledger will report (to floating-point error), for "planned vs spent".

    rounds: 1-based rounds to return (default 1..T). With PLD each returned
    round costs ~30 ms on top of one composition per round.
    """
    steps = _positive_int("steps_per_round", steps_per_round)
    per_round = [make_release(z, sampling_rate, sampling, steps, population, sample_size)
                 for z in schedule.noise_multipliers()]
    chosen = accountant or accounting.reported_accountant(per_round)
    if rounds is not None:
        bad = [t for t in rounds if not 1 <= t <= schedule.num_rounds]
        if bad:
            raise ValueError(f"rounds must be in 1..{schedule.num_rounds}, got {bad}")
    return accounting.epsilons_by_round(per_round, delta, chosen,
                                        value_discretization_interval, rounds)


# ----------------------------------------------------------------------------- calibration


def calibrate(shape: Shape, num_rounds: int, sampling_rate: float, sampling: str,
              delta: float, target_epsilon: float, *, steps_per_round: int = 1,
              population: int | None = None, sample_size: int | None = None,
              accountant: str | None = None, tolerance: float = 0.01,
              value_discretization_interval: float =
              DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> NoiseSchedule:
    """Scale ``shape`` so that epsilon after round ``num_rounds`` is in
    ``[(1 - tolerance) * target_epsilon, target_epsilon]`` (never above).

    Sampling arguments and ``steps_per_round`` are those of the run (see
    :meth:`PrivacyLedger.record`); ``accountant`` is the ledger's (None = the
    reported one). Raises ``ValueError`` (one line) when the target cannot be
    met with noise multipliers in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER].

    Method: a cheap vectorised RDP estimate gives the starting scale and
    slope; secant steps on log(epsilon) vs log(scale), kept in a bisection
    bracket, then use the exact accountant. PLD runs at a coarse
    discretisation first, then (usually once) at the ledger's. Each distinct
    noise value costs one PLD construction per evaluation, hence ``levels``.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
    if not 0 < tolerance < 0.5:
        raise ValueError(f"tolerance must be in (0, 0.5), got {tolerance!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    rel = NoiseSchedule(shape, num_rounds).noise_multipliers()  # validates the shape
    steps = _positive_int("steps_per_round", steps_per_round)
    runs: list[list] = []  # [relative value, rounds] for runs of equal values
    for v in rel:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])

    def releases(scale: float) -> tuple[DpRelease, ...]:
        # Same merged releases as a ledger recording the run round by round.
        return tuple(merge(make_release(scale * v, sampling_rate, sampling, steps * n,
                                        population, sample_size) for v, n in runs))

    chosen = accountant or accounting.reported_accountant(releases(1.0))
    if chosen not in accounting.ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}, got {chosen!r}")
    if chosen == "pld" and not accounting.pld_supported(releases(1.0)):
        raise ValueError("PLD does not support sampling='fixed': use accountant='rdp'")

    def estimate(scale: float) -> float:
        return accounting.estimate_epsilon(releases(scale), delta)

    lo, hi = MIN_NOISE_MULTIPLIER / min(rel), MAX_NOISE_MULTIPLIER / max(rel)
    if estimate(hi) > target_epsilon and \
            accounting.epsilon(releases(hi), delta, chosen) > target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon:g} is unreachable: noise multiplier "
                         f"{MAX_NOISE_MULTIPLIER:g} still gives more")
    if estimate(lo) < target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon:g} is above what noise multiplier "
                         f"{MIN_NOISE_MULTIPLIER:g} spends: no calibration needed")

    def solve_estimate(goal: float) -> float:
        """Scale where the estimate equals ``goal`` (bisection on log scale)."""
        a, b = math.log(lo), math.log(hi)
        while b - a > 1e-7:
            m = (a + b) / 2
            if estimate(math.exp(m)) > goal:
                a = m
            else:
                b = m
        return math.exp(b)

    # Work in x = log(scale); log(epsilon) is close to linear in x.
    aim = target_epsilon * (1 - tolerance / 2)
    x = math.log(solve_estimate(aim))
    bounds = (math.log(lo), math.log(hi))
    h = 1e-3
    slope = (math.log(estimate(math.exp(x + h))) - math.log(estimate(math.exp(x - h)))) / (2 * h)

    def reaim_estimate(x: float, e: float) -> float:
        """After the first exact value: the accountant / estimate ratio varies
        slowly, so aim the estimate at aim * estimate / exact."""
        return math.log(solve_estimate(aim * estimate(math.exp(x)) / e))

    vdi = value_discretization_interval
    coarse_vdi = min(_COARSE_VDI, target_epsilon / 100)  # PLD error is ~vdi/2 in epsilon
    reaim = reaim_estimate
    if chosen == "pld" and coarse_vdi > 2 * vdi:
        # Cheap PLD first; the fine one is a little tighter (smaller), so aim
        # at the middle of the window with a narrow tolerance.
        x, slope = _search(
            lambda s: accounting.epsilon(releases(s), delta, "pld", coarse_vdi),
            x, slope, aim, (aim * (1 - tolerance / 5), aim * (1 + tolerance / 5)), bounds,
            reaim)
        reaim = None
    x, _ = _search(lambda s: accounting.epsilon(releases(s), delta, chosen, vdi),
                   x, slope, aim, ((1 - tolerance) * target_epsilon, target_epsilon), bounds,
                   reaim)
    return NoiseSchedule(shape, num_rounds, math.exp(x))


def _search(exact, x: float, slope: float, aim: float, window: tuple[float, float],
            bounds: tuple[float, float], reaim=None,
            max_evaluations: int = 30) -> tuple[float, float]:
    """Find x = log(scale) with ``exact(scale)`` inside ``window``.

    Secant steps on log(epsilon) - log(aim), starting from ``x`` with
    ``slope`` (negative: more noise, less epsilon), kept inside a bracket
    [bad, good] (epsilon above / below the window) by bisection. Returns
    (x, last slope). Without convergence, returns the safe side if known.
    ``bounds`` limit x; epsilon still too high at the upper bound raises.
    ``reaim(x, epsilon)``, if given, proposes the second point.
    """
    low, high = window
    x = min(max(x, bounds[0]), bounds[1])
    bad = good = None
    prev = None
    for _ in range(max_evaluations):
        e = exact(math.exp(x))
        if low <= e <= high:
            return x, slope
        y = math.log(max(e, 1e-300) / aim) if math.isfinite(e) else math.inf
        if e > high:
            if x >= bounds[1]:
                raise ValueError(f"target epsilon unreachable: noise multiplier "
                                 f"{MAX_NOISE_MULTIPLIER:g} still gives {e:.4g}")
            bad = x if bad is None else max(bad, x)
        else:
            good = x if good is None else min(good, x)
        if prev is not None and math.isfinite(y) and math.isfinite(prev[1]) and x != prev[0]:
            secant = (y - prev[1]) / (x - prev[0])
            if secant < 0:
                slope = secant
        first = prev is None
        prev = (x, y)
        if first and reaim is not None and 0 < e < math.inf:
            nxt = reaim(x, e)
        else:
            nxt = x - y / slope if math.isfinite(y) else x + math.log(2)
        if bad is not None and good is not None:
            if good - bad < 1e-12:
                break
            if not bad < nxt < good:
                nxt = (bad + good) / 2
        x = min(max(nxt, bounds[0]), bounds[1])
    if good is not None:
        return good, slope  # the safe side (epsilon below the window)
    raise ValueError("calibration did not converge")  # pragma: no cover
