"""Noise schedules and their calibration, checked by recomputing epsilon with
dp-accounting directly from the schedule's noise multipliers."""

from __future__ import annotations

import itertools
import math

import pytest
from dp_accounting import dp_event as de
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedpriv.privacy import (
    NoiseSchedule,
    calibrate,
    constant,
    cosine,
    linear,
    phases,
    planned_epsilons,
    planned_ledger,
    step,
)

DELTA = 1e-5
Q = 0.02
T = 40
TARGET = 1.0


def direct_epsilon(noise_multipliers, q, steps_per_round=1, accountant="pld"):
    """dp-accounting on hand-built events: one Poisson-subsampled Gaussian per
    step, runs of equal noise grouped with SelfComposedDpEvent."""
    events = [
        de.SelfComposedDpEvent(de.PoissonSampledDpEvent(q, de.GaussianDpEvent(z)),
                               steps_per_round * len(list(group)))
        for z, group in itertools.groupby(noise_multipliers)
    ]
    if accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    else:
        acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(de.ComposedDpEvent(events))
    return acc.get_epsilon(DELTA)


# --------------------------------------------------------------------------- shapes


def test_shapes_values():
    assert NoiseSchedule(constant(1.3), 4).noise_multipliers() == [1.3] * 4
    per_round = NoiseSchedule(linear(2.0, 1.0, levels=5), 5).noise_multipliers()
    assert per_round == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    blocks = NoiseSchedule(linear(2.0, 1.0, levels=2), 6, scale=2.0).noise_multipliers()
    assert blocks == pytest.approx([4.0] * 3 + [2.0] * 3)
    cos = NoiseSchedule(cosine(2.0, 1.0, levels=3), 3).noise_multipliers()
    assert cos == pytest.approx([2.0, 1.5, 1.0])
    assert NoiseSchedule(step(0.5, 2, start=4.0), 5).noise_multipliers() == [4, 4, 2, 2, 1]
    sched = NoiseSchedule(phases([(2, 1.5), (1, 0.7)]), 3)
    assert sched.noise_multipliers() == [1.5, 1.5, 0.7]
    assert sched.noise_multiplier(3) == 0.7


@pytest.mark.parametrize("make", [
    lambda: NoiseSchedule(phases([(2, 1.0)]), 3),          # rounds do not add up
    lambda: NoiseSchedule(constant(-1.0), 3),              # negative noise
    lambda: NoiseSchedule(step(0.0, 1), 3),                # noise hits zero
    lambda: NoiseSchedule(constant(), 0),
    lambda: linear(levels=0),
    lambda: NoiseSchedule(constant(), 3).noise_multiplier(4),
])
def test_bad_schedules_raise(make):
    with pytest.raises(ValueError):
        make()


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("shape", [
    constant(),
    linear(1.0, 0.5, levels=3),
    cosine(1.5, 1.0, levels=3),
    step(0.8, 20),
    phases([(10, 2.0), (30, 1.0)]),
], ids=["constant", "linear", "cosine", "step", "phases"])
def test_calibrated_schedule_ends_just_below_target(shape):
    schedule = calibrate(shape, T, Q, "poisson", DELTA, TARGET)
    values = schedule.noise_multipliers()
    assert [v / schedule.scale for v in values] == pytest.approx(list(shape.values(T)))
    eps = direct_epsilon(values, Q)
    assert 0.99 * TARGET <= eps <= TARGET * (1 + 1e-9)
    # The run's ledger reports the same figure.
    assert planned_ledger(schedule, Q, "poisson").epsilon(DELTA) == pytest.approx(eps, rel=1e-6)


def test_calibrate_local_dp_sgd_steps_per_round():
    """3 rounds of 8 DP-SGD steps at q=0.125: PLD epsilon 4.6845 is z=1.0."""
    schedule = calibrate(constant(), 3, 0.125, "poisson", DELTA, 4.6845, steps_per_round=8)
    assert schedule.scale == pytest.approx(1.0, abs=0.01)
    eps = direct_epsilon(schedule.noise_multipliers(), 0.125, steps_per_round=8)
    assert 0.99 * 4.6845 <= eps <= 4.6845 * (1 + 1e-9)


@pytest.mark.parametrize("target", [1e-4, 0.0, -1.0, math.inf, math.nan])
def test_impossible_targets_raise(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate(constant(), T, Q, "poisson", DELTA, target)


def test_planned_epsilons_follow_the_ledger():
    schedule = NoiseSchedule(phases([(5, 1.2), (5, 0.9)]), 10)
    planned = planned_epsilons(schedule, 0.05, "poisson", DELTA)
    assert len(planned) == 10 and planned == sorted(planned)
    for t in (5, 10):
        ledger = planned_ledger(schedule, 0.05, "poisson", rounds=t)
        assert planned[t - 1] == pytest.approx(ledger.epsilon(DELTA), rel=1e-6)
    assert planned[-1] == pytest.approx(direct_epsilon(schedule.noise_multipliers(), 0.05),
                                        rel=1e-6)
    assert planned_epsilons(schedule, 0.05, "poisson", DELTA, rounds=[10, 5]) == \
        pytest.approx([planned[9], planned[4]], rel=1e-12)
