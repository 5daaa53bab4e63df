"""Federated analytics with the Laplace mechanism (fedpriv.analytics, clients.analytics): the noise's
scale, the clipped contributions, the server's bounds on replies, and whole runs through the real
round loop whose privacy.json total is recomputed independently from the releases it lists."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from clients.analytics import label_distribution, validation_contribution
from fedpriv import run_folder
from fedpriv.analytics import ValidationSum, checked_histogram, checked_validation, validation_due
from fedpriv.callbacks import Callback
from fedpriv.compose import compose_config
from fedpriv.errors import ConfigError
from fedpriv.launch import final_report
from fedpriv.privacy.laplace import LaplaceMechanism, laplace_scale
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.task import ClientData

QUIET = ["tracking.progress=false"]
RUN = ["num_clients=12", "clients_per_round=4", "num_rounds=3", "analytics=central", *QUIET]
CENTRAL = ["privacy=central", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "privacy.delta=1e-5"]


# ------------------------------------------------------------------ the mechanism


@pytest.mark.parametrize("secure", [True, False])
def test_laplace_noise_has_variance_two_b_squared_and_is_recorded_first(secure):
    mech = LaplaceMechanism(secure=secure, seed=3)
    ledger = PrivacyLedger()
    sensitivity, eps = 2.0, 0.5
    b = laplace_scale(sensitivity, eps)
    values = np.full(100_000, 7.0)
    noisy = mech.release(values, sensitivity=sensitivity, epsilon=eps, ledger=ledger, label="t")
    noise = noisy - values
    # Var of Laplace(b) is 2 b^2 = 32; over 100k draws the sample variance's relative sd is sqrt(5/n) = 0.7%
    assert noise.var() == pytest.approx(2 * b * b, rel=0.03)
    assert abs(noise.mean()) < 5 * math.sqrt(2) * b / math.sqrt(len(noise))
    assert np.mean(np.abs(noise)) == pytest.approx(b, rel=0.02)  # E|X| = b: a Laplace, not a Gaussian (E|X| = 0.80 std)
    assert ledger.releases_table() == [{"label": "t", "mechanism": "laplace", "count": 1, "sensitivity": 2.0,
                                        "scale": b, "epsilon_each": pytest.approx(eps), "epsilon": pytest.approx(eps)}]


def test_seeded_laplace_is_reproducible_per_stream_and_secure_is_not():
    a = LaplaceMechanism(secure=False, seed=1).release([0.0] * 5, sensitivity=1, epsilon=1, ledger=PrivacyLedger(),
                                                       label="x", stream=4)
    b = LaplaceMechanism(secure=False, seed=1).release([0.0] * 5, sensitivity=1, epsilon=1, ledger=PrivacyLedger(),
                                                       label="x", stream=4)
    np.testing.assert_array_equal(a, b)
    mech = LaplaceMechanism(secure=True)
    c = mech.release([0.0] * 5, sensitivity=1, epsilon=1, ledger=PrivacyLedger(), label="x", stream=4)
    d = mech.release([0.0] * 5, sensitivity=1, epsilon=1, ledger=PrivacyLedger(), label="x", stream=4)
    assert not np.array_equal(c, d)


# ------------------------------------------------------------------ the clients' contributions


def test_label_distribution_is_bounded_in_l1():
    v = label_distribution(np.array([0, 0, 3, 3, 3, 9, 42, -1]), 10)  # 42 and -1 are not classes
    assert v.sum() == pytest.approx(1.0) and v.min() >= 0
    np.testing.assert_allclose(v[[0, 3, 9]], [2 / 6, 3 / 6, 1 / 6])
    assert np.abs(label_distribution(np.array([], dtype=np.int64), 10)).sum() == 0.0  # no rows: nothing


def test_validation_contribution_is_an_accuracy_in_unit_interval():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.bias.zero_()
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1])
    data = ClientData(0, x, y, x, y)
    assert validation_contribution(model, data) == (pytest.approx(0.75), 1)
    empty = ClientData(0, x, y, x[:0], y[:0])
    assert validation_contribution(model, empty) == (0.0, 0)
    total = ValidationSum()
    for acc, n in ((0.75, 1), (1.7, 1), (-3.0, 1), (0.9, 0)):  # clipped to [0, 1]; nothing without a count
        total.add(acc, n)
    assert (total.accuracy_sum, total.clients) == (pytest.approx(1.75), 3)


def _reply(metrics: dict, analytics: dict) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics),
                               "analytics": MetricRecord(analytics)}), dst_node_id=0, message_type="train")


def test_the_server_leaves_out_replies_beyond_their_bounds(flower_run_identity):
    share = {"clients-trained": 2, "clients-declined": 0, "clients-failed": 1, "clients-rejected": 0}
    assert checked_validation(_reply(share, {"val-acc-sum": 2.5, "val-clients": 3})) == (2.5, 3)
    assert checked_validation(_reply(share, {"val-acc-sum": 3.5, "val-clients": 3})) is None  # sum > count
    assert checked_validation(_reply(share, {"val-acc-sum": 1.0, "val-clients": 4})) is None  # more than the share
    assert checked_validation(_reply({"num-examples": 5.0}, {"val-acc-sum": 1.0, "val-clients": 2})) is None
    assert checked_validation(_reply({"num-examples": 5.0}, {"val-acc-sum": 0.5, "val-clients": 1})) == (0.5, 1)
    ok = _reply({}, {"label-sum": [0.5, 1.5, 0.0], "clients-answered": 2})
    assert checked_histogram(ok, 2, 3)[1] == 2
    assert checked_histogram(_reply({}, {"label-sum": [0.5, 2.5, 0.0], "clients-answered": 2}), 2, 3) is None
    assert checked_histogram(_reply({}, {"label-sum": [0.5, 1.5], "clients-answered": 2}), 2, 3) is None
    assert checked_histogram(_reply({}, {"label-sum": [0.5, 1.5, 0.0], "clients-answered": 3}), 2, 3) is None


def test_validation_cadence_and_refusals():
    rc = compose_config(["analytics=central", "analytics.validation_every=2"])
    assert [validation_due(rc, t) for t in (1, 2, 3, 4)] == [False, True, False, True]
    assert not validation_due(compose_config(["analytics=central", "analytics.epsilon_validation=null"]), 2)
    for bad, key in ((["privacy=local"], "analytics.mode"), (["privacy=central_local"], "analytics.mode"),
                     (["analytics.epsilon_validation=0"], "analytics.epsilon_validation"),
                     (["analytics.validation_every=0"], "analytics.validation_every")):
        with pytest.raises(ConfigError, match=key):
            compose_config(["analytics=central", *bad])


# ------------------------------------------------------------------ whole runs


def _independent_pld_epsilon(events: list[dict], delta: float) -> float:
    """The total epsilon built directly from dp-accounting's mechanism PLDs, one per listed event."""
    pld = None
    for e in events:
        if e.get("kind") == "laplace":
            term = pld_lib.from_laplace_mechanism(e["scale"], sensitivity=e["sensitivity"],
                                                  value_discretization_interval=1e-3).self_compose(e["count"])
        else:
            assert e["sampling"] == "poisson"
            term = pld_lib.from_gaussian_mechanism(e["noise_multiplier"], sampling_prob=e["sampling_rate"],
                                                   value_discretization_interval=1e-3).self_compose(e["count"])
        pld = term if pld is None else pld.compose(term)
    return float(pld.get_epsilon_for_delta(delta))


def _rdp_epsilon(events: list[dict], delta: float) -> float:
    acc = rdp_lib.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    for e in events:
        if e.get("kind") == "laplace":
            acc.compose(dp_event.LaplaceDpEvent(e["scale"] / e["sensitivity"]), e["count"])
        else:
            acc.compose(dp_event.PoissonSampledDpEvent(e["sampling_rate"], dp_event.GaussianDpEvent(
                e["noise_multiplier"])), e["count"])
    return acc.get_epsilon(delta)


def test_central_run_lists_every_release_and_its_total_is_recomputed_independently(tmp_path, flower_run_identity):
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    rc = compose_config([*RUN, *CENTRAL, "analytics.epsilon_label_histogram=1.0", "analytics.epsilon_validation=0.5",
                         f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    releases = report["analytics"]["releases"]
    assert [(r["label"], r["mechanism"], r["count"], r["sensitivity"], r["scale"]) for r in releases] == [
        ("label histogram", "laplace", 1, 1.0, 1.0), ("validation accuracy", "laplace", 3, 2.0, 4.0)]
    assert [r["epsilon"] for r in releases] == [pytest.approx(1.0), pytest.approx(1.5)]
    laplace = [e for e in report["events"] if e.get("kind") == "laplace"]
    assert len(laplace) == 2 and sum(e["count"] for e in report["events"]) == 3 + 1 + 3
    independent = _independent_pld_epsilon(report["events"], 1e-5)
    assert report["epsilon"] == pytest.approx(independent, rel=1e-3)
    assert report["epsilon"] <= _rdp_epsilon(report["events"], 1e-5)  # PLD is the tighter bound
    training = _independent_pld_epsilon([e for e in report["events"] if e.get("kind") != "laplace"], 1e-5)
    assert report["epsilon_training"] == pytest.approx(training, rel=1e-3)
    assert training < report["epsilon"] < training + 2.5  # composition beats adding the pure epsilons
    assert summary["epsilon"] == report["epsilon"] and summary["analytics_epsilon"] == pytest.approx(2.5)
    # published: the noisy figure only; the raw sums are in the (operator-only) checkpoint
    metrics = run_folder.read_metrics(tmp_path)
    assert all(0.0 <= m["analytics_val_accuracy"] <= 1.0 for m in metrics)
    assert not any("val-acc" in k or "raw" in k for m in metrics for k in m)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    raw = checkpoint["analytics"]["raw"]
    diagnostics = [json.loads(line) for line in (tmp_path / "operator_only" / "diagnostics.jsonl").read_text().splitlines()]
    assert [n for _, _, n in raw] == [d["num_clients"] for d in diagnostics]  # every trained client validated once
    assert all(0.0 <= s <= n for _, s, n in raw)
    dist = report["analytics"]["label_distribution"]
    assert len(dist) == 10 and sum(dist) == pytest.approx(1.0) and min(dist) >= 0


class CrashAfter(Callback):
    def after_round(self, state, result):
        if result.server_round == 1:
            raise RuntimeError("simulated crash")
        return False


def test_resume_keeps_the_releases_and_never_releases_the_histogram_twice(tmp_path, flower_run_identity):
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    base = [*RUN, "privacy=central", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
            "privacy.secure_rng=false", f"run_dir={tmp_path}"]
    with pytest.raises(RuntimeError):
        run_federation(InProcessGrid(2), compose_config(base), [CrashAfter()])
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["analytics"]
    run_federation(InProcessGrid(2), compose_config([*base, "resume=true"]))
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert [(r["label"], r["count"]) for r in report["analytics"]["releases"]] == [
        ("label histogram", 1), ("validation accuracy", 3)]
    assert report["analytics"]["label_noisy_sum"] == before["histogram"]["noisy_sum"]


def test_without_central_dp_only_the_analytics_are_covered(tmp_path, flower_run_identity):
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    rc = compose_config([*RUN, "analytics.validation_every=2", "analytics.epsilon_label_histogram=1.0",
                         "analytics.epsilon_validation=0.5", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["epsilon"] == "inf" and "epsilon" not in summary and summary["analytics_epsilon"] == pytest.approx(1.5)
    assert "fedpriv: central DP" not in final_report(summary, rc)  # no run-level guarantee to announce
    assert report["analytics"]["epsilon"] == pytest.approx(1.0 + 0.5)  # one histogram, one validation (round 2)
    assert [m.get("analytics_val_accuracy") is not None for m in run_folder.read_metrics(tmp_path)] == [False, True,
                                                                                                       False]


LOCAL = ["num_clients=6", "clients_per_round=6", "sampling=all", "num_rounds=2", "privacy=local",
         "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0", "privacy.accountant=rdp",
         "train.batch_size=64", "privacy.local.grad_sample_mode=hooks", "analytics=local",
         "analytics.epsilon_label_histogram=1.0", "analytics.epsilon_validation=0.5", *QUIET]


def test_local_analytics_are_charged_to_each_clients_own_ledger(tmp_path, flower_run_identity):
    """Under local DP each client noises its own figures and its epsilon (the 'local' table) is that of its
    DP-SGD steps composed with its Laplace releases, recomputed here with an independent RDP accountant."""
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation
    from fedpriv.privacy.local import sampling_plan
    from fedpriv.task import load_client_data

    rc = compose_config([*LOCAL, f"run_dir={tmp_path}"])
    run_federation(InProcessGrid(3), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    table = {row["client_id"]: row["epsilon"] for row in report["local"]["clients"]}
    for c in range(6):
        plan = sampling_plan(len(load_client_data(rc, c).x_train), 64, 1)
        acc = rdp_lib.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc.compose(dp_event.PoissonSampledDpEvent(plan.sample_rate, dp_event.GaussianDpEvent(1.0)), 2 * plan.steps)
        acc.compose(dp_event.LaplaceDpEvent(1.0))  # label counts, sensitivity 1, epsilon 1
        acc.compose(dp_event.LaplaceDpEvent(2.0), 2)  # correct predictions, epsilon 0.5, two rounds
        assert table[f"client-{c}"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
        ledger = json.loads((tmp_path / run_folder.SIMULATED_CLIENT_STATE / f"ledger-client-{c}.json").read_text())
        labels = [(e.get("label"), e["count"]) for e in ledger["ledger"]["events"] if e.get("kind") == "laplace"]
        assert labels == [("label histogram", 1), ("validation accuracy", 1), ("validation accuracy", 1)]
    section = report["analytics"]
    assert [r["epsilon_each"] for r in section["per_client_releases"]] == [1.0, 0.5]
    assert "rows" not in json.dumps(run_folder.read_metrics(tmp_path))  # only the noisy accuracy is published
    assert all(0 <= m["analytics_val_accuracy"] <= 1 for m in run_folder.read_metrics(tmp_path))
    with pytest.raises(ConfigError, match="analytics.mode"):
        compose_config(["analytics=local"])  # privacy=none: no client ledger to charge


def test_the_budget_covers_the_whole_run_training_and_analytics(tmp_path, flower_run_identity):
    """privacy.target_epsilon bounds the run's total: the training is calibrated to what the planned analytics
    releases leave; the total privacy.json reports (recomputed from its events) is within the budget."""
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation
    from fedpriv.privacy.plan import make_noise_plan, planned_pure_releases

    over = ["privacy=central", "privacy.target_epsilon=4", "privacy.delta=1e-5", "analytics.epsilon_validation=0.3",
            "analytics.validation_every=2"]
    rc = compose_config([*RUN, *over, "num_rounds=4", f"run_dir={tmp_path}"])
    assert [(r.label, r.count) for r in planned_pure_releases(rc).events] == [("label histogram", 1),
                                                                             ("validation accuracy", 2)]
    assert "budgets the whole run" in make_noise_plan(rc).caveats[-1]
    run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    total = _independent_pld_epsilon(report["events"], 1e-5)
    assert 0.97 * 4 <= total <= 4 * (1 + 1e-3) and report["epsilon"] == pytest.approx(total, rel=1e-3)
    assert report["epsilon_training"] < 4 - 0.5  # the analytics (1.1 on their own at delta 0) took a share
    with pytest.raises(ConfigError, match="privacy.target_epsilon.*alone cost"):
        make_noise_plan(compose_config([*RUN, *over, "analytics.epsilon_label_histogram=5"]))
