"""A client's DP-SGD calibration under privacy=local analytics=local budgets its own analytics releases
(issue #14): DP-SGD over the planned participations composed with the client's planned Laplace releases
(label counts once, one validation release per participation where it is due) stays within
privacy.local.target_epsilon and uses at least 99% of it.

Every figure is recomputed here with dp-accounting's mechanism PLDs (or its RDP accountant) built
directly, in the order a client really records its releases (label counts before round 1, each
validation release before that round's training), not with the project's ledger."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.errors import ConfigError
from fedpriv.preflight import check_local_plans
from fedpriv.privacy.local import (noise_plan, planned_analytics, planned_participations, planned_split,
                                   planned_validations, sampling_plan)

VDI = 1e-4  # finer than the ledger's 1e-3: an independent, tighter figure
QUIET = ["tracking.progress=false"]
LOCAL = ["privacy=local", "analytics=local", "privacy.local.delta=1e-4", *QUIET]


def release_order(participations: int, validations: int, num_rounds: int, every: int) -> list[bool]:
    """For each planned participation, whether a validation release precedes its training: under
    sampling=all the due rounds (every ``every``-th), else ``validations`` of them spread evenly."""
    if not validations:
        return [False] * participations
    if participations == num_rounds:
        return [(k + 1) % every == 0 for k in range(participations)]
    spots = {((k + 1) * participations) // validations - 1 for k in range(validations)}
    return [k in spots for k in range(participations)]


def independent_pld(zs, q, steps, eps_hist, eps_val, validated, delta) -> float:
    def laplace(eps):
        return pld_lib.from_laplace_mechanism(1.0 / eps, sensitivity=1.0, value_discretization_interval=VDI,
                                              pessimistic_estimate=True)

    rounds = {z: pld_lib.from_gaussian_mechanism(z, sampling_prob=q, value_discretization_interval=VDI,
                                                 pessimistic_estimate=True).self_compose(steps) for z in set(zs)}
    pld = laplace(eps_hist) if eps_hist is not None else None
    for z, val in zip(zs, validated):
        if val:
            pld = laplace(eps_val) if pld is None else pld.compose(laplace(eps_val))
        pld = rounds[z] if pld is None else pld.compose(rounds[z])
    return float(pld.get_epsilon_for_delta(delta))


def independent_rdp(zs, q, steps, eps_hist, eps_val, validated, delta) -> float:
    acc = rdp_lib.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    if eps_hist is not None:
        acc.compose(dp_event.LaplaceDpEvent(1.0 / eps_hist))
    for z, val in zip(zs, validated):
        if val:
            acc.compose(dp_event.LaplaceDpEvent(1.0 / eps_val))
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


CASES = [
    # (overrides, rows): sampling=all, validation every 3 rounds (the heart study's plan)
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=15", "privacy.local.target_epsilon=8",
      "analytics.epsilon_label_histogram=0.5", "analytics.epsilon_validation=0.5", "analytics.validation_every=3",
      "train.batch_size=32", "train.local_epochs=1"], 96),
    # Poisson sampling of clients: participations and validations planned at ~98th percentiles
    (["num_clients=10", "clients_per_round=5", "num_rounds=20", "privacy.local.target_epsilon=4",
      "analytics.epsilon_label_histogram=0.3", "analytics.epsilon_validation=0.2", "analytics.validation_every=2",
      "train.batch_size=64", "train.local_epochs=2"], 700),
    # a decreasing noise schedule: the shape is kept, the whole plan scaled
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=6", "schedule=linear",
      "privacy.local.target_epsilon=3",
      "analytics.epsilon_label_histogram=0.5", "analytics.epsilon_validation=null",
      "train.batch_size=50", "train.local_epochs=1"], 400),
    # the RDP accountant
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=5", "privacy.accountant=rdp",
      "privacy.local.target_epsilon=6",
      "analytics.epsilon_label_histogram=1.0", "analytics.epsilon_validation=0.5", "analytics.validation_every=1",
      "train.batch_size=32", "train.local_epochs=1"], 250),
]


@pytest.mark.parametrize("over, rows", CASES)
def test_calibrated_plan_with_analytics_is_within_one_percent_below_the_target(over, rows):
    rc = compose_config([*LOCAL, *over])
    lo, an = rc.privacy.local, rc.analytics
    plan = sampling_plan(rows, rc.train.batch_size, rc.train.local_epochs)
    zs = noise_plan(rc, plan)
    e, v = planned_participations(rc), planned_validations(rc)
    assert len(zs) == e
    validated = release_order(e, v, rc.num_rounds, an.validation_every)
    assert sum(validated) == v
    args = (zs, plan.sample_rate, plan.steps, an.epsilon_label_histogram, an.epsilon_validation, validated, lo.delta)
    eps = independent_rdp(*args) if rc.privacy.accountant == "rdp" else independent_pld(*args)
    assert 0.99 * lo.target_epsilon <= eps <= lo.target_epsilon
    # the analytics took a real share: DP-SGD alone at these noises spends clearly less than the target
    alone = (independent_rdp if rc.privacy.accountant == "rdp" else independent_pld)(
        zs, plan.sample_rate, plan.steps, None, None, [False] * e, lo.delta)
    assert alone < 0.95 * lo.target_epsilon


@pytest.mark.parametrize("over, expected", [
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=15", "analytics.validation_every=3"], 5),
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=16", "analytics.validation_every=3"], 5),
    # D = 10 due rounds, p = 0.5: ceil(5 + 2 sqrt(2.5)) = 9 (participations: ceil(10 + 2 sqrt(5)) = 15)
    (["num_clients=10", "clients_per_round=5", "num_rounds=20", "analytics.validation_every=2"], 9),
    # never more than the planned participations
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=10", "analytics.validation_every=1",
      "privacy.local.expected_rounds=4"], 4),
    (["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=10", "analytics.epsilon_validation=null"], 0),
])
def test_planned_validations(over, expected):
    rc = compose_config([*LOCAL, "privacy.local.target_epsilon=8", *over])
    assert planned_validations(rc) == expected
    labels = [(label, count) for label, _, count in planned_analytics(rc)]
    assert labels == [("label histogram", 1)] + ([("validation accuracy", expected)] if expected else [])


def test_planned_split_names_each_share():
    rc = compose_config([*LOCAL, *CASES[0][0]])
    split = planned_split(rc, sampling_plan(96, 32, 1))
    assert split["participations"] == 15 and [a["count"] for a in split["analytics"]] == [1, 5]
    # six pure releases at 0.5: at most 3 by basic composition (delta 0); at delta 1e-4 a little less
    assert 2.9 <= split["epsilon_analytics"] <= 3.0
    # basic composition: DP-SGD's (e, delta) and the releases' pure 3 compose to at most (e + 3, delta)
    assert split["epsilon_dp_sgd"] < split["epsilon_planned"] <= min(8.0, split["epsilon_dp_sgd"] + 3.0)
    assert split["epsilon_planned"] >= 0.99 * 8


def test_no_analytics_leaves_the_calibration_as_before():
    over = ["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=4", "privacy.local.target_epsilon=3",
            *QUIET]
    with_none = compose_config(["privacy=local", "privacy.local.delta=1e-4", *over])
    assert planned_analytics(with_none) == ()
    plan = sampling_plan(512, 64, 1)
    zs = noise_plan(with_none, plan)
    eps = independent_pld(zs, plan.sample_rate, plan.steps, None, None, [False] * 4, 1e-4)
    assert 0.99 * 3 <= eps <= 3


def test_analytics_that_spend_the_budget_alone_are_refused_before_any_work():
    # label counts at 0.5 and five validations at 0.5: 3 at delta 0, above a budget of 2.5
    rc = compose_config([*LOCAL, *CASES[0][0], "privacy.local.target_epsilon=2.5"])
    with pytest.raises(ConfigError, match="privacy.local.target_epsilon.*analytics releases alone"):
        noise_plan(rc, sampling_plan(96, 32, 1))
    with pytest.raises(ConfigError, match="privacy.local.target_epsilon"):  # preflight: the same calibration
        check_local_plans(rc, np.array([96, 200]))


def test_a_run_with_local_analytics_spends_its_budget_and_no_client_declines(tmp_path, flower_run_identity):
    """Each client's epsilon, recomputed from its own ledger's events with dp-accounting, is within 1%
    below the target after every planned round and analytics release, and no round was declined."""
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    rc = compose_config([*LOCAL, "num_clients=3", "clients_per_round=3", "sampling=all", "num_rounds=3",
                         "privacy.local.target_epsilon=4", "analytics.epsilon_label_histogram=0.5",
                         "analytics.epsilon_validation=0.3", "analytics.validation_every=1", "train.batch_size=64",
                         "privacy.local.grad_sample_mode=hooks", f"run_dir={tmp_path}"])
    run_federation(InProcessGrid(1), rc)
    report = json.loads((tmp_path / run_folder.PRIVACY).read_text())
    local = report["local"]
    assert local["clients_declined_any_round"] == 0 and len(local["clients"]) == 3
    assert "calibrated its DP-SGD noise" in report["analytics"]["caveats"][0]
    for row in local["clients"]:
        path = tmp_path / run_folder.SIMULATED_CLIENT_STATE / f"ledger-{row['client_id']}.json"
        book = json.loads(path.read_text())
        events = book["ledger"]["events"]
        kinds = [(e.get("kind"), e.get("label")) for e in events]
        assert kinds[0] == ("laplace", "label histogram") and book["rounds"] == 3 and book["declined"] == 0
        pld = None
        for e in events:  # in the client's own order
            if e.get("kind") == "laplace":
                term = pld_lib.from_laplace_mechanism(e["scale"], sensitivity=e["sensitivity"],
                                                      value_discretization_interval=VDI).self_compose(e["count"])
            else:
                term = pld_lib.from_gaussian_mechanism(e["noise_multiplier"], sampling_prob=e["sampling_rate"],
                                                       value_discretization_interval=VDI).self_compose(e["count"])
            pld = term if pld is None else pld.compose(term)
        eps = float(pld.get_epsilon_for_delta(1e-4))
        assert 0.99 * 4 <= eps <= 4
        assert row["epsilon"] == pytest.approx(eps, rel=1e-3)
