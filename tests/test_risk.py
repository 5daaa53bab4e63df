"""Privacy risk assessment (fedpriv.risk): attack metrics, the (epsilon, delta) ceilings, who took
part, and an end-to-end assessment of tiny digits runs.

Metrics are checked on score distributions with known answers (two Gaussians: AUC = Phi(d / sqrt 2),
TPR at FPR a = Phi(Phi^-1(a) + d); hand-counted scores). The ceilings are checked against
computations that share no code with them: the ROC of Kairouz et al.'s extremal (eps, delta)
mechanism built from its probabilities, the Gaussian mechanism's exact trade-off curve at the
delta that dp-accounting's PLD gives, and numerical integration.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution
from scipy import integrate, stats

from fedpriv.compose import compose_config
from fedpriv.risk import (
    advantage_ceiling,
    attack_figures,
    auc,
    auc_ceiling,
    balanced_accuracy_ceiling,
    tpr_ceiling,
)
from fedpriv.risk.attacks import (
    lira_offline_scores,
    loss_scores,
    per_example,
    train_reference,
)
from fedpriv.risk.ceiling import guarantees_of
from fedpriv.risk.membership import participation
from fedpriv.task import dataset_for, new_model

pytestmark = pytest.mark.usefixtures("flower_run_identity")

TINY = ["num_clients=10", "clients_per_round=5", "num_rounds=3", "tracking.progress=false"]


# ------------------------------------------------------------------------------ attack metrics


def test_auc_and_tpr_of_two_gaussians_match_their_closed_forms():
    rng = np.random.default_rng(1)
    for d in (0.5, 1.0, 3.0):
        members, nonmembers = rng.normal(d, 1, 100_000), rng.normal(0, 1, 100_000)
        fig = attack_figures(members, nonmembers)
        assert fig["auc"] == pytest.approx(stats.norm.cdf(d / math.sqrt(2)), abs=0.005)
        for key, a in (("0.1%", 0.001), ("1%", 0.01)):
            assert fig["tpr_at_fpr"][key] == pytest.approx(stats.norm.cdf(stats.norm.ppf(a) + d), abs=0.02)
        best = stats.norm.cdf(d / 2) - stats.norm.cdf(-d / 2)  # max TPR - FPR at the midpoint threshold
        assert fig["advantage"] == pytest.approx(best, abs=0.01)
        assert fig["balanced_accuracy"] == pytest.approx((1 + best) / 2, abs=0.005)


def test_figures_on_hand_counted_scores():
    nonmembers = np.arange(1000.0)  # 0 .. 999
    members = np.concatenate([1000 + np.arange(30.0), np.full(20, 998.5), np.full(25, 994.5), np.full(25, 0.5)])
    fig = attack_figures(members, nonmembers)
    assert fig["tpr_at_fpr"]["0.1%"] == pytest.approx(0.50)  # one false positive (999) allowed
    assert fig["tpr_at_fpr"]["1%"] == pytest.approx(0.75)  # ten allowed (990 .. 999)
    assert fig["auc"] == pytest.approx((30 + 20 * 0.999 + 25 * 0.995 + 25 * 0.001) / 100)
    assert fig["advantage"] == pytest.approx(0.75 - 0.005)
    assert auc(members, nonmembers) == fig["auc"]


def test_a_tpr_the_sample_cannot_resolve_is_none_with_the_reason():
    fig = attack_figures(np.arange(10.0) + 1000, np.arange(999.0))
    assert fig["tpr_at_fpr"]["0.1%"] is None and "999 non-members" in fig["tpr_at_fpr_notes"]["0.1%"]
    assert fig["tpr_at_fpr"]["1%"] == 1.0
    assert attack_figures(np.ones(3), np.zeros(99))["tpr_at_fpr"]["1%"] is None
    with pytest.raises(ValueError):
        attack_figures(np.array([np.nan]), np.zeros(3))


# ---------------------------------------------------------------------------------- ceilings


def kairouz_vertices(eps: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The ROC vertices (FPR, TPR) of the best randomised tests on the extremal mechanism of Kairouz
    et al. (2015, Thm 2.1): Neyman-Pearson over its four outcomes, sorted by likelihood ratio."""
    e = math.exp(eps)
    p0 = np.array([delta, (1 - delta) * e / (1 + e), (1 - delta) / (1 + e), 0.0])
    p1 = p0[::-1].copy()
    # The mechanism is (eps, delta)-DP both ways: the hockey-stick divergence is delta.
    assert np.maximum(p1 - e * p0, 0).sum() <= delta + 1e-12 and np.maximum(p0 - e * p1, 0).sum() <= delta + 1e-12
    order = np.argsort(-(p1 / np.maximum(p0, 1e-300)))
    return np.concatenate([[0.0], np.cumsum(p0[order])]), np.concatenate([[0.0], np.cumsum(p1[order])])


def kairouz_roc(eps: float, delta: float, fpr: np.ndarray) -> np.ndarray:
    """Best TPR at each FPR: randomised tests join the vertices linearly."""
    return np.interp(fpr, *kairouz_vertices(eps, delta))


@pytest.mark.parametrize("eps,delta", [(0.1, 1e-5), (1.0, 1e-5), (3.0, 1e-3), (8.0, 1e-5), (0.5, 0.1)])
def test_tpr_ceiling_is_the_roc_of_the_extremal_mechanism(eps, delta):
    grid = np.linspace(0, 1, 20_001)
    np.testing.assert_allclose(tpr_ceiling(grid, eps, delta), kairouz_roc(eps, delta, grid), atol=1e-9)
    # The AUC ceiling (closed form) against the area of that polyline and quad of the ceiling curve.
    assert auc_ceiling(eps, delta) == pytest.approx(np.trapezoid(*kairouz_vertices(eps, delta)[::-1]), abs=1e-12)
    kinks = [(1 - delta) / (math.exp(eps) + 1), 1 - delta]
    quad, _ = integrate.quad(lambda a: tpr_ceiling(a, eps, delta), 0, 1, points=kinks)
    assert auc_ceiling(eps, delta) == pytest.approx(quad, abs=1e-9)
    best = np.max(tpr_ceiling(grid, eps, delta) - grid)
    assert advantage_ceiling(eps, delta) == pytest.approx(best, abs=1e-4)
    assert balanced_accuracy_ceiling(eps, delta) == pytest.approx((1 + best) / 2, abs=1e-4)


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_ceiling_holds_the_gaussian_mechanism_at_dp_accountings_delta_and_touches_it(sigma):
    """The Gaussian mechanism's exact trade-off curve TPR = Phi(Phi^-1(FPR) + 1/sigma) must lie under
    the ceiling of every (eps, delta(eps)) pair dp-accounting's PLD gives it, and touch it."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(sigma)
    grid = np.concatenate([np.logspace(-6, -1, 400), np.linspace(0.1, 1 - 1e-6, 400)])
    exact = stats.norm.cdf(stats.norm.ppf(grid) + 1 / sigma)
    for eps in (0.5, 1.0, 2.0, 4.0):
        delta = pld.get_delta_for_epsilon(eps)
        ceiling = tpr_ceiling(grid, eps, delta)
        assert np.all(ceiling >= exact - 1e-9)
        assert np.min(ceiling - exact) < 2e-3  # tight: the pair is on the mechanism's privacy profile


def test_no_guarantee_means_no_ceiling_and_guarantees_are_read_from_published_figures():
    assert auc_ceiling(math.inf, 0.0) == 1.0 and tpr_ceiling(0.001, math.inf, 0.0) == 1.0
    assert balanced_accuracy_ceiling(0.0, 0.0) == 0.5 and auc_ceiling(0.0, 0.0) == pytest.approx(0.5)
    central = guarantees_of({"epsilon": 2.0, "delta": 1e-5, "unit": "user (client)"})
    assert [(g.name, g.epsilon, g.delta) for g in central] == [("central", 2.0, 1e-5)]
    local = guarantees_of({"mode": "local", "local": {"epsilon_max": 3.0, "delta": 1e-5}})
    assert [(g.name, g.epsilon) for g in local] == [("local", 3.0)]
    both = guarantees_of({"epsilon": "inf", "delta": 1e-5, "local": {"epsilon_bound": 4.0, "delta": 1e-6}})
    assert [(g.name, g.epsilon) for g in both] == [("central", math.inf), ("local", 4.0)]
    assert guarantees_of(None)[0].epsilon == math.inf
    # An audit preset that drew a tenth of the noise: the claimed epsilon is not the ceiling's.
    broken = {"epsilon": 1.0, "delta": 1e-5, "audit": {"noise_scale": 0.1, "accountant_epsilon_of_noise_drawn": 250.0}}
    assert guarantees_of(broken)[0].epsilon == 250.0
    assert guarantees_of({**broken, "audit": {"noise_scale": 1.0}})[0].epsilon == 1.0


# ----------------------------------------------------------------------------------- attacks


def test_attacks_find_a_memorising_model_and_not_an_untrained_one():
    """A model trained 100 epochs on 50 digits rows, against 400 rows it never saw; LiRA's
    reference models get another 400 rows. An untrained model gives no signal."""
    torch.set_num_threads(1)  # small models: one thread is far faster on a shared machine
    rc = compose_config(TINY)
    ds = dataset_for(rc)
    idx = np.random.default_rng(0).permutation(len(ds.y_train))
    mem, non, aux = idx[:50], idx[50:450], idx[450:850]
    x, y = ds.x_train, ds.y_train
    for epochs, low, high in ((100, 0.75, 1.0), (0, 0.38, 0.62)):
        target = train_reference(rc, x[mem], y[mem], epochs=epochs, seed=5) if epochs else new_model(rc)
        (lm, cm), (ln, cn) = per_example(target, x[mem], y[mem]), per_example(target, x[non], y[non])
        refs = [train_reference(rc, x[aux], y[aux], epochs=20, seed=10 + k) for k in range(3)]
        ref = np.stack([np.concatenate([per_example(r, x[mem], y[mem])[1], per_example(r, x[non], y[non])[1]])
                        for r in refs])
        scores, _ = lira_offline_scores(np.concatenate([cm, cn]), ref)
        assert low < attack_figures(loss_scores(lm), loss_scores(ln))["auc"] < high
        assert low < attack_figures(scores[:50], scores[50:])["auc"] < high


# ---------------------------------------------------------------------------- end to end


class Cohorts:
    """Records every round's cohort (who was sampled) as the engine saw it."""

    def __init__(self):
        self.clients: set[int] = set()

    def on_start(self, state):
        pass

    def after_round(self, state, result):
        self.clients |= {int(c) for c in result.cohort}
        return False

    def on_end(self, state, summary):
        pass


def _run(tmp_path, name, extra, callbacks=()):
    from conftest import InProcessGrid

    from fedpriv.federation import run_federation

    run_dir = tmp_path / name
    rc = compose_config(TINY + [f"run_dir={run_dir}", *extra])
    run_federation(InProcessGrid(2), rc, list(callbacks))
    return rc, run_dir


def test_who_took_part_is_replayed_or_read_exactly_and_otherwise_every_client(tmp_path):
    from fedpriv.federation import sampler_seed

    seen = Cohorts()
    rc, run_dir = _run(tmp_path, "none", ["num_clients=20", "clients_per_round=4"], [seen])
    part = participation(rc, run_dir, None, 3, sampler_seed(rc))
    assert part.clients == seen.clients and part.source.startswith("exact: replay")
    assert participation(rc, run_dir, None, 3, sampler_seed(rc) + 1).clients is None  # a wrong replay is refused

    seen = Cohorts()
    rc, run_dir = _run(tmp_path, "local", ["privacy=local", "privacy.local.target_epsilon=8"], [seen])
    report = json.loads((run_dir / "privacy.json").read_text())
    part = participation(rc, run_dir, report, 3, sampler_seed(rc))
    assert part.clients == seen.clients and "ledgers" in part.source

    rc, run_dir = _run(tmp_path, "central", ["privacy=central", "privacy.target_epsilon=8"])
    assert sampler_seed(rc) is None
    part = participation(rc, run_dir, json.loads((run_dir / "privacy.json").read_text()), 3, None)
    assert part.clients is None and part.expected_never_sampled_fraction == pytest.approx(0.5**3)


def test_end_to_end_assessment_of_a_central_dp_run(tmp_path, capsys):
    import assess_risk  # scripts/ (on sys.path below)

    _, run_dir = _run(tmp_path, "run", ["privacy=central", "privacy.target_epsilon=2"])
    before = json.loads((run_dir / "privacy.json").read_text())
    assert assess_risk.main([str(run_dir), "--reference-models", "2", "--reference-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "ceiling: central guarantee" in out and "attack: loss threshold" in out and "LiRA" in out

    full = json.loads((run_dir / "operator_only" / "risk_assessment.json").read_text())
    for name in ("loss_threshold", "lira_offline"):
        fig = full["attacks"][name]
        assert 0 <= fig["auc"] <= 1 and fig["members"] > 0 and fig["nonmembers"] > 0
        assert fig["tpr_at_fpr"]["0.1%"] is None  # digits has too few non-members to resolve it
    assert full["participation"]["clients_known"] is False

    report = json.loads((run_dir / "privacy.json").read_text())
    risk = report["risk"]
    eps, delta = before["epsilon"], before["delta"]
    assert risk["ceiling"]["auc"] == pytest.approx(auc_ceiling(eps, delta))
    assert risk["ceiling"]["tpr_at_fpr"]["1%"] == pytest.approx(tpr_ceiling(0.01, eps, delta))
    assert "empirical" not in risk and risk["empirical_published"] is False
    assert "risk_assessment.json" in risk["operator_only"] and "operator_only/risk_assessment.json" in report["outputs"]
    assert "members" not in json.dumps(risk["ceilings"])  # no raw counts in the published section
    assert {k: v for k, v in report.items() if k not in ("risk", "outputs")} == \
        {k: v for k, v in before.items() if k != "outputs"}  # nothing else in privacy.json changed

    assert assess_risk.main([str(run_dir), "--reference-models", "0", "--publish"]) == 0
    risk = json.loads((run_dir / "privacy.json").read_text())["risk"]
    assert set(risk["empirical"]) == {"loss_threshold"} and "NOT covered" in risk["empirical_caveat"]


def test_a_non_private_run_gets_a_privacy_json_with_only_the_risk_section(tmp_path, capsys):
    import assess_risk

    _, run_dir = _run(tmp_path, "run", [])
    assert not (run_dir / "privacy.json").exists()
    assert assess_risk.main([str(run_dir), "--reference-models", "0"]) == 0
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["mode"] == "none" and report["risk"]["ceiling"]["auc"] == 1.0
    full = json.loads((run_dir / "operator_only" / "risk_assessment.json").read_text())
    assert full["participation"]["clients_known"] is True


def _error_line(capsys, argv):
    import assess_risk

    with pytest.raises(SystemExit) as exc:
        assess_risk.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("fedpriv: error: ")
    return err[0]


def test_a_missing_foreign_or_model_less_run_folder_is_one_error_line(tmp_path, capsys):
    assert "does not exist" in _error_line(capsys, [str(tmp_path / "nope")])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    assert "not a finished fedpriv run folder" in _error_line(capsys, [str(tmp_path / "foreign")])
    _, run_dir = _run(tmp_path, "run", [])
    modelless = tmp_path / "modelless"
    shutil.copytree(run_dir, modelless)
    (modelless / "model.pt").unlink()
    assert "no model.pt" in _error_line(capsys, [str(modelless)])
    (modelless / "model.pt").write_bytes(b"not a model")
    assert "not this run's model" in _error_line(capsys, [str(modelless)])
    assert "--reference-fraction" in _error_line(capsys, [str(run_dir), "--reference-fraction", "1.5"])


@pytest.fixture(autouse=True)
def _scripts_on_path(monkeypatch):
    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
