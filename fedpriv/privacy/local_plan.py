"""A client's DP-SGD plan under local (example-level) DP: what it will release and with what noise.

What the privacy unit and the neighbouring relation are: :mod:`fedpriv.privacy.local`. This module
holds what the client and the launcher's preflight both compute from the configuration and the
client's row count (nothing here reads an example):

* :func:`sampling_plan` -- the Poisson rate and step count Opacus uses for ``n`` rows;
* :func:`planned_participations` -- how many rounds a client plans for;
* :func:`planned_analytics` -- its own Laplace releases under ``analytics=local`` (label counts once,
  the validation figure in each participation where it is due), which spend from the same budget;
* :func:`noise_plan` -- the noise multiplier of each participation, calibrated so that DP-SGD over the
  planned participations composed with the planned analytics releases stays within
  ``privacy.local.target_epsilon`` (and uses at least 99% of it), cached per row count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedpriv.config import ConfigError, RunConfig
from fedpriv.sampling import participation

from . import schedules
from .ledger import PrivacyLedger
from .plan import schedule_shape

HISTOGRAM, VALIDATION = "label histogram", "validation accuracy"  # fedpriv.analytics's release labels


# --------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingPlan:
    """What one round of DP-SGD on ``n`` rows costs: ``steps`` Poisson steps at rate ``q``."""

    n: int
    batch_size: int
    epochs: int
    sample_rate: float  # each row's chance to be in one step's batch
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def expected_batch_size(self) -> int:
        """Opacus divides the noisy sum by this (never by the batch's real size, which is private)."""
        return int(self.n * self.sample_rate)


def sampling_plan(n: int, batch_size: int, epochs: int) -> SamplingPlan:
    """The Poisson rate and step count Opacus uses for a loader of ``batch_size`` over ``n`` rows."""
    if n < 1:
        raise ConfigError(f"DP-SGD needs at least one training row, got {n}")
    if batch_size < 1 or epochs < 1:
        raise ConfigError(f"config key 'train': batch_size and local_epochs must be >= 1, got {batch_size}, {epochs}")
    batches = math.ceil(n / batch_size)  # len(DataLoader(..., batch_size, drop_last=False))
    q = 1 / batches  # DPDataLoader.from_data_loader: sample_rate = 1 / len(data_loader)
    return SamplingPlan(n, batch_size, epochs, q, int(1 / q))  # UniformWithReplacementSampler.steps


# ---------------------------------------------------------------------- the client's privacy plan


def planned_participations(rc: RunConfig) -> int:
    """Rounds a client calibrates its noise for.

    ``privacy.local.expected_rounds`` when set. Otherwise a client joins each of ``T`` rounds with
    probability ``p`` (1 under ``sampling=all``, ``clients_per_round / num_clients`` otherwise), so
    its participations are Binomial(T, p); it plans for ``min(T, ceil(Tp + 2 sqrt(Tp(1-p))))``
    (about the 98th percentile): most clients never meet the budget stop, at the price of a
    little more noise per round than planning for the mean ``Tp`` would give.
    """
    lo = rc.privacy.local
    if lo.expected_rounds is not None:
        if lo.expected_rounds < 1:
            raise ConfigError(f"config key 'privacy.local.expected_rounds': must be >= 1, got {lo.expected_rounds}")
        return int(lo.expected_rounds)
    t, p = participation(rc.sampling, rc.num_clients, rc.clients_per_round, rc.num_rounds, rc.cyclic_groups)
    return max(1, min(t, math.ceil(t * p + 2 * math.sqrt(t * p * (1 - p)) - 1e-9)))


def _relative_plan(shape: schedules.Shape, num_rounds: int, participations: int) -> tuple[float, ...]:
    """The run's shape over ``num_rounds`` server rounds, compressed onto a client's
    ``participations``: its k-th participation takes the value at the same fraction of the run."""
    over_run = shape.values(num_rounds)
    return tuple(over_run[min(num_rounds - 1, (k * num_rounds) // participations)] for k in range(participations))


def planned_validations(rc: RunConfig) -> int:
    """Validation releases (analytics=local) a client plans for: one per participation in a round where
    validation is due. ``D = num_rounds // validation_every`` rounds are due; a client joins each with
    probability ``p``, so it plans for the same ~98th percentile of Binomial(D, p) as its participations,
    and never for more than its planned participations."""
    an = rc.analytics
    if an.mode != "local" or an.epsilon_validation is None:
        return 0
    due = rc.num_rounds // an.validation_every
    _, p = participation(rc.sampling, rc.num_clients, rc.clients_per_round, rc.num_rounds, rc.cyclic_groups)
    likely = math.ceil(due * p + 2 * math.sqrt(due * p * (1 - p)) - 1e-9)
    return max(0, min(due, likely, planned_participations(rc)))


def planned_analytics(rc: RunConfig) -> tuple[tuple[str, float, int], ...]:
    """The client's own planned Laplace releases under analytics=local, as (label, epsilon each, count):
    its label counts once (before round 1) and its validation figure :func:`planned_validations` times.
    Both have example-level L1 sensitivity 1 (clients/analytics.py), so Laplace scale = 1 / epsilon."""
    an = rc.analytics
    if an.mode != "local":
        return ()
    out = []
    if an.epsilon_label_histogram is not None:
        out.append((HISTOGRAM, float(an.epsilon_label_histogram), 1))
    v = planned_validations(rc)
    if v:
        out.append((VALIDATION, float(an.epsilon_validation), v))
    return tuple(out)


def _planned_ledger(zs: tuple[float, ...], sample_rate: float, steps: int,
                    pure: tuple[tuple[str, float, int], ...]) -> PrivacyLedger:
    """The ledger a client following the plan ends with: its DP-SGD participations (``steps`` steps at each
    noise multiplier of ``zs``), then its planned Laplace releases. A client records the releases in another
    order (label counts first, each validation release before that round's training); composition is
    commutative, and the PLD's figure moves with the order only by its rounding (~1e-11 relative, measured),
    which the calibration's 0.1% margin below the target covers."""
    ledger = PrivacyLedger()
    for z in zs:
        ledger.record(z, sample_rate, "poisson", count=steps)  # equal consecutive values merge: one PLD
    for label, eps, count in pure:  # L1 sensitivity 1 (one example), scale 1 / epsilon
        ledger.record_laplace(1.0 / eps, count, label=label, sensitivity=1.0, scale=1.0 / eps)
    return ledger


@lru_cache(maxsize=256)
def _calibrated_plan(rel: tuple[float, ...], sample_rate: float, steps: int, delta: float,
                     target: float, accountant: str,
                     pure: tuple[tuple[str, float, int], ...] = ()) -> tuple[float, ...]:
    shape = schedules.phases([(1, v) for v in rel])
    try:
        sched = schedules.calibrate(shape, len(rel), sample_rate, "poisson", delta, target,
                                    steps_per_round=steps, accountant=accountant)
    except ValueError as exc:
        raise ConfigError(f"config key 'privacy.local.target_epsilon': {target:g} cannot be reached: {exc}") from None
    alone = tuple(sched.noise_multipliers())
    if not pure:
        return alone
    return _with_analytics(alone, rel, sample_rate, steps, delta, target, accountant, pure)


def _with_analytics(alone: tuple[float, ...], rel: tuple[float, ...], sample_rate: float, steps: int,
                    delta: float, target: float, accountant: str,
                    pure: tuple[tuple[str, float, int], ...]) -> tuple[float, ...]:
    """Scale the DP-SGD plan up from ``alone`` (calibrated to ``target`` by itself) until DP-SGD composed
    with the planned Laplace releases is in [0.992, 0.999] x target (0.1% left for the order in which the
    releases really come). Hand-written: calibrate (schedules) knows no fixed extra releases, and
    dp-accounting's calibrate_dp_mechanism does not use this ledger, whose figure the client enforces.
    A secant search on log(epsilon) against log(scale), kept inside a bisection bracket: epsilon falls
    monotonically as the noise grows; a few ledger evaluations."""
    def composed(scale: float) -> float:
        return _planned_ledger(tuple(scale * v for v in rel), sample_rate, steps, pure).epsilon(delta, accountant)

    only = _planned_ledger((), sample_rate, steps, pure).epsilon(delta, accountant)
    if only >= target:
        raise ConfigError(f"config key 'privacy.local.target_epsilon': {target:g} is spent by the planned analytics "
                          f"releases alone (epsilon {only:.4g}: {', '.join(f'{l} x{c}' for l, _, c in pure)}); lower "
                          "analytics.epsilon_* or raise the budget")
    # 99.2% at least: an independent, finer PLD of the same plan stays above 99% of the target
    low, high, aim = 0.992 * target, 0.999 * target, math.log(0.995 * target)
    top = math.log(schedules.MAX_NOISE_MULTIPLIER / max(rel))
    x_lo = math.log(alone[0] / rel[0])  # DP-SGD alone already spends >= 0.99 x target: more noise is needed
    e_lo = composed(math.exp(x_lo))
    if e_lo <= high:  # the analytics' share is lost in the PLD's rounding
        return alone
    x_hi = e_hi = None  # enough noise: epsilon below the window
    x = min(x_lo + math.log(target / (target - only)), top)  # first guess: scale by the share left
    for i in range(40):
        e = composed(math.exp(x))
        if low <= e <= high:
            return tuple(math.exp(x) * v for v in rel)
        if e > high:
            if x >= top:
                raise ConfigError(f"config key 'privacy.local.target_epsilon': {target:g} cannot be reached with "
                                  f"the planned analytics releases: noise multiplier {math.exp(top):g} still gives "
                                  f"{e:.4g}")
            x_lo, e_lo = x, e
        else:
            x_hi, e_hi = x, e
        if x_hi is None:  # not bracketed yet: step up by twice what epsilon ~ 1 / scale suggests
            x = min(x_lo + max(0.05, 2 * (math.log(e_lo) - aim)), top)
        elif i % 3 == 2:  # a bisection step now and then: the secant alone may creep from one side
            x = (x_lo + x_hi) / 2
        else:
            x = x_lo + (aim - math.log(e_lo)) * (x_hi - x_lo) / (math.log(e_hi) - math.log(e_lo))
    if x_hi is None:
        raise ConfigError(f"config key 'privacy.local.target_epsilon': {target:g} cannot be reached with the "
                          "planned analytics releases")
    return tuple(math.exp(x_hi) * v for v in rel)  # the safe side of the bracket


def noise_plan_key(rc: RunConfig, plan: SamplingPlan) -> str:
    """Everything a client's noise plan depends on, as a string."""
    lo = rc.privacy.local
    e = planned_participations(rc)
    return json.dumps({
        "rel": _relative_plan(schedule_shape(rc), rc.num_rounds, e),
        "q": plan.sample_rate, "steps": plan.steps, "delta": lo.delta, "target": lo.target_epsilon,
        "z": lo.noise_multiplier, "accountant": rc.privacy.accountant, "analytics": planned_analytics(rc),
    }, sort_keys=True)


def noise_plan(rc: RunConfig, plan: SamplingPlan) -> tuple[float, ...]:
    """Noise multiplier of a client's 1st, 2nd, ... participation (its last value beyond).

    With ``noise_multiplier`` set: that value, then following the shape. Else calibrated so that the
    planned participations composed with the client's planned analytics releases
    (:func:`planned_analytics`: they spend from the same budget) reach at most ``target_epsilon``, and
    at least 99% of it (the same search as central DP's schedules, then the analytics' share).
    """
    lo = rc.privacy.local
    e = planned_participations(rc)
    rel = _relative_plan(schedule_shape(rc), rc.num_rounds, e)
    if lo.noise_multiplier is not None:  # the first participation gets it, as under central DP
        return tuple(float(lo.noise_multiplier) * v / rel[0] for v in rel)
    if lo.target_epsilon is None:
        raise ConfigError("config key 'privacy.local': give target_epsilon or noise_multiplier")
    return _calibrated_plan(rel, plan.sample_rate, plan.steps, float(lo.delta), float(lo.target_epsilon),
                            rc.privacy.accountant, planned_analytics(rc))


def planned_split(rc: RunConfig, plan: SamplingPlan) -> dict[str, Any]:
    """How a client with ``plan``'s rows splits its budget: the epsilon of its planned DP-SGD alone, of its
    planned analytics releases alone, and of both composed (each at privacy.local.delta)."""
    lo = rc.privacy.local
    zs, pure = noise_plan(rc, plan), planned_analytics(rc)
    acc, delta = rc.privacy.accountant, float(lo.delta)
    return {"participations": len(zs), "analytics": [{"label": l, "epsilon_each": e, "count": c} for l, e, c in pure],
            "epsilon_dp_sgd": _planned_ledger(zs, plan.sample_rate, plan.steps, ()).epsilon(delta, acc),
            "epsilon_analytics": _planned_ledger((), plan.sample_rate, plan.steps, pure).epsilon(delta, acc),
            "epsilon_planned": _planned_ledger(zs, plan.sample_rate, plan.steps, pure).epsilon(delta, acc)}


def budget_words(rc: RunConfig) -> str:
    """privacy.json's note on how each client's budget is split between DP-SGD and its own analytics."""
    lo, pure = rc.privacy.local, planned_analytics(rc)
    if lo.target_epsilon is None or lo.noise_multiplier is not None:
        return ("the DP-SGD noise is set (privacy.local.noise_multiplier), not calibrated: the analytics releases "
                "spend from the same ledger and a client may decline its last rounds")
    releases = ", ".join(f"{l} x{c} at epsilon {e:g} each" for l, e, c in pure) or "none"
    return (f"each client calibrated its DP-SGD noise so that DP-SGD over its {planned_participations(rc)} planned "
            f"participations, composed with its planned analytics releases ({releases}), stays within "
            f"privacy.local.target_epsilon={lo.target_epsilon:g} (and uses at least 99% of it); the analytics' share "
            "is taken from DP-SGD's, and a client that takes part more often than planned declines the extra rounds")
