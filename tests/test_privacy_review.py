"""An independent review's checks of this session's privacy code, each against a computation of its own:

* the composition of a round's Poisson-sampled Gaussian (training) with an UNamplified Laplace release
  (federated analytics) on the SAME sampled cohort: the exact hockey-stick curve of the joint mixture,
  in closed form here, must lie under the ledger's curve (fedpriv.privacy.accounting's Jensen argument),
  and above the curve a wrong claim (Laplace amplified independently) would give;
* the O(cohort) Poisson sampler (geometric gaps) has the law the accountant assumes: each client
  independently with probability q (scipy's binomial, chi-square);
* repeat-and-select refuses runs whose training has no guarantee (privacy=none with analytics lists only
  the analytics' releases, which must not turn into a finite tuning epsilon).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import integrate, stats
from scipy.stats import norm

from fedpriv.errors import DataError
from fedpriv.privacy import sweep_selection as ss
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.sampling import ClientSampler

# ------------------------------------------------------------------ one cohort, two mechanisms


def _given_laplace_ratio(eps: float, sigma: float, q: float, lap: float) -> tuple[float, float]:
    """For a fixed Laplace likelihood ratio ``lap``: E_P[(R - e^eps)_+] and E_P[(1 - e^eps R)_+] over the
    Gaussian output Y ~ N(0, sigma^2), where R = (1 - q) + q lap g(Y), g(y) = exp((2y - 1) / (2 sigma^2))."""
    a, e = q * lap, math.exp(eps)
    c = e - (1 - q)
    if c <= 0:
        add = (1 - q) + a - e
    else:  # R > e^eps  <=>  Y > y0
        y0 = sigma ** 2 * math.log(c / a) + 0.5
        add = a * norm.sf((y0 - 1) / sigma) - c * norm.sf(y0 / sigma)
    d = 1 - e * (1 - q)
    if d <= 0:
        remove = 0.0
    else:  # 1 > e^eps R  <=>  Y < y1
        y1 = sigma ** 2 * math.log(d / (e * a)) + 0.5
        remove = d * norm.cdf(y1 / sigma) - e * a * norm.cdf((y1 - 1) / sigma)
    return add, remove


def joint_delta(eps: float, sigma: float, b: float, q: float) -> float:
    """Exact delta(eps) (worst of both directions) of one round in which a client joins with probability q
    and, when it joins, moves BOTH a Gaussian sum (sensitivity 1, std sigma) and a Laplace sum (sensitivity 1,
    scale b). Under P = N(0, sigma^2) x Lap(0, b) the Laplace ratio is e^(-1/b) on z <= 0 (mass 1/2),
    e^(1/b) on z >= 1 (mass e^(-1/b) / 2) and e^((2z - 1)/b) in between (density e^(-z/b) / (2b))."""
    total = np.zeros(2)
    for mass, lap in ((0.5, math.exp(-1 / b)), (0.5 * math.exp(-1 / b), math.exp(1 / b))):
        total += mass * np.array(_given_laplace_ratio(eps, sigma, q, lap))
    for k in (0, 1):
        middle, _ = integrate.quad(lambda z: math.exp(-z / b) / (2 * b) * _given_laplace_ratio(
            eps, sigma, q, math.exp((2 * z - 1) / b))[k], 0.0, 1.0, epsabs=1e-15)
        total[k] += middle
    return float(total.max())


def test_the_closed_form_reduces_to_dp_accountings_mechanisms_in_its_limits():
    """q = 1: the plain composition Gaussian x Laplace; b -> inf: the Poisson-sampled Gaussian alone."""
    both = pld_lib.from_gaussian_mechanism(1.5, value_discretization_interval=1e-5).compose(
        pld_lib.from_laplace_mechanism(2.0, value_discretization_interval=1e-5))
    sampled = pld_lib.from_gaussian_mechanism(1.0, sampling_prob=0.1, value_discretization_interval=1e-5)
    for eps in (0.3, 1.0, 2.0):
        assert joint_delta(eps, 1.5, 2.0, 1.0) == pytest.approx(both.get_delta_for_epsilon(eps), rel=1e-3, abs=1e-9)
        assert joint_delta(eps, 1.0, 1e9, 0.1) == pytest.approx(sampled.get_delta_for_epsilon(eps), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("sigma,b,q", [(1.0, 1.0, 0.1), (2.0, 2.0, 0.2), (0.8, 0.5, 0.05)])
def test_unamplified_laplace_on_the_sampled_cohort_is_covered_by_the_ledger(sigma, b, q):
    ledger = PrivacyLedger()
    ledger.record(sigma, q, "poisson")
    ledger.record_laplace(b, label="validation accuracy")
    # What claiming amplification for the Laplace too (as if its cohort were drawn apart) would give.
    independent = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=1e-4).compose(
        pld_lib.from_laplace_mechanism(b, sampling_prob=q, value_discretization_interval=1e-4))
    for eps in (0.2, 0.5, 1.0, 1.5, 2.5):
        truth = joint_delta(eps, sigma, b, q)
        if truth < 1e-10:  # below what the closed form's cancellations resolve
            continue
        assert ledger.delta_for_epsilon(eps, "pld") >= truth * (1 - 1e-9)
        assert ledger.delta_for_epsilon(eps, "rdp") >= truth * (1 - 1e-9)
        assert independent.get_delta_for_epsilon(eps) < truth  # so this test can tell a wrong claim


# ------------------------------------------------------------------ the sampler the accountant assumes


def test_poisson_cohorts_have_the_law_the_accountant_assumes():
    """n = 40 clients, q = 0.15, 20,000 cohorts: each client's inclusion count, the cohort size and the
    joint inclusion of neighbouring clients (the gaps construction must not couple them) against the
    binomial law of independent Bernoulli(q) draws."""
    n, q, draws = 40, 0.15, 20_000
    sampler = ClientSampler("poisson", n, int(n * q), 11)
    assert sampler.rate == pytest.approx(q)
    hits = np.zeros((draws, n), dtype=bool)
    for t in range(draws):
        cohort = sampler.sample()
        assert np.all(np.diff(cohort) > 0) and (len(cohort) == 0 or (cohort[0] >= 0 and cohort[-1] < n))
        hits[t, cohort] = True
    per_client = hits.sum(axis=0)
    # each count ~ Binomial(draws, q), independent across clients: their squared z-scores sum to a chi2(n)
    z2 = ((per_client - draws * q) ** 2 / (draws * q * (1 - q))).sum()
    assert stats.chi2.sf(z2, n) > 1e-4  # the same q for every client
    sizes = np.bincount(hits.sum(axis=1), minlength=n + 1)
    expected = stats.binom.pmf(np.arange(n + 1), n, q) * draws
    keep = expected >= 5  # pool the thin tails into one cell
    observed = np.r_[sizes[keep], sizes[~keep].sum()]
    wanted = np.r_[expected[keep], expected[~keep].sum()]
    assert stats.chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue > 1e-4
    both = (hits[:, :-1] & hits[:, 1:]).sum()  # neighbours, n - 1 pairs per draw
    pairs = draws * (n - 1)
    assert abs(both - pairs * q * q) < 5 * math.sqrt(pairs * q * q * (1 - q * q))
    assert stats.binomtest(int(hits[:, 0].sum()), draws, q).pvalue > 1e-4  # the first client: not shifted
    assert stats.binomtest(int(hits[:, -1].sum()), draws, q).pvalue > 1e-4  # nor the last


# ------------------------------------------------------------------ repeat-and-select needs private runs

LAPLACE_ONLY = [{"noise_multiplier": 2.0, "sampling_rate": 1.0, "sampling": "all", "count": 3, "population": None,
                 "sample_size": None, "kind": "laplace", "label": "validation accuracy", "mechanism": "laplace",
                 "sensitivity": 2.0, "scale": 4.0, "pure_epsilon": None}]


def test_a_sweep_of_runs_without_a_training_guarantee_is_refused(tmp_path):
    """privacy=none with analytics=central writes privacy.json with epsilon inf and only the analytics'
    events: the tuning must not report the analytics' figure as the guarantee of the released best run."""
    plan = ss.make_plan(["train.lr=0.1,0.2"], 3.0, math.inf, tmp_path, np.random.default_rng(3))
    while plan["num_runs"] == 0:
        plan = ss.make_plan(["train.lr=0.1,0.2"], 3.0, math.inf, tmp_path, np.random.default_rng())
    for i, r in enumerate(plan["runs"]):
        folder = tmp_path / f"{i}"
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"seed": r["seed"], "train": {"lr": [0.1, 0.2][
            r["candidate"]]}}))
        (folder / "summary.json").write_text(json.dumps({"final_accuracy": 0.5 + 0.01 * i, "analytics_epsilon": 1.5}))
        (folder / "privacy.json").write_text(json.dumps({
            "epsilon": "inf", "delta": 0.0, "neighbouring_relation": "add_or_remove_one", "events": LAPLACE_ONLY,
            "summary": {"analytics_epsilon": 1.5}}))
    with pytest.raises(DataError, match="no guarantee"):
        ss.select(plan, tmp_path, delta=1e-5)


# ------------------------------------------------------------------ a fixed-noise run's budget covers the analytics


def _pld_total(events: list[dict], delta: float) -> float:
    """The total epsilon from dp-accounting's mechanism PLDs, one per listed event (not the project's ledger)."""
    total = None
    for e in events:
        if e.get("kind") == "laplace":
            term = pld_lib.from_laplace_mechanism(e["scale"], sensitivity=e["sensitivity"],
                                                  value_discretization_interval=1e-3)
        else:
            assert e["sampling"] == "poisson" and e.get("kind", "gaussian") == "gaussian"
            term = pld_lib.from_gaussian_mechanism(e["noise_multiplier"], sampling_prob=e["sampling_rate"],
                                                   value_discretization_interval=1e-3)
        term = term.self_compose(e["count"])
        total = term if total is None else total.compose(term)
    return float(total.get_epsilon_for_delta(delta))


def test_a_fixed_noise_runs_budget_stops_before_the_analytics_overspend_it(tmp_path, flower_run_identity):
    """privacy.noise_multiplier with privacy.target_epsilon as the budget: the training alone (z=1, q=1/3) stays
    under 5.3 for all 4 rounds (5.12), but with 4 validation releases (epsilon 0.5 each) the run would reach 6.3.
    The budget covers the whole run: the run must stop while its total, analytics included, is within 5.3."""
    from conftest import InProcessGrid

    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation

    rc = compose_config(["num_clients=12", "clients_per_round=4", "num_rounds=4", "tracking.progress=false",
                         "privacy=central", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=5.3",
                         "privacy.delta=1e-5", "analytics=central", "analytics.epsilon_label_histogram=null",
                         "analytics.epsilon_validation=0.5", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    total = _pld_total(report["events"], 1e-5)
    assert report["epsilon"] == pytest.approx(total, rel=1e-3)
    assert total <= 5.3 * (1 + 1e-3), summary
    assert summary["rounds_completed"] == 2 and "budget" in str(summary["stop_reason"])
    # Only the releases of the rounds that run count: 20 planned validations (10 on their own) must not refuse a
    # run whose first rounds, with their own validations, fit the budget.
    from fedpriv.privacy.plan import make_noise_plan

    long = compose_config(["num_clients=12", "clients_per_round=4", "num_rounds=20", "privacy=central",
                           "privacy.noise_multiplier=1.0", "privacy.target_epsilon=5.3", "privacy.delta=1e-5",
                           "analytics=central", "analytics.epsilon_label_histogram=null",
                           "analytics.epsilon_validation=0.5"])
    plan = make_noise_plan(long)
    assert plan.reserved(2).num_releases == 2 and plan.reserved(20).num_releases == 20


# ------------------------------------------------------------------ private selection and an interrupted run


class StopAfterRound2:
    """Ctrl-C after round 2 finished: the launcher's stop event, set from a callback."""

    def __init__(self, stop):
        self.stop = stop

    def on_start(self, state):
        pass

    def after_round(self, state, result):
        if result.server_round == 2:
            self.stop.set()
        return False

    def on_end(self, state, summary):
        pass


def test_an_interrupted_run_defers_the_selection_to_the_end_of_its_resumed_run(tmp_path, flower_run_identity):
    """Ctrl-C after round 2 of 4: nothing is drawn nor charged (the run is not over); the resumed run draws once at
    its end, among every validated round (not only those before the interruption)."""
    import threading

    from conftest import InProcessGrid

    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation
    from fedpriv.selection import DECISION

    base = ["num_clients=12", "clients_per_round=4", "num_rounds=4", "tracking.progress=false", "privacy=central",
            "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "privacy.delta=1e-5",
            "privacy.secure_rng=false", "analytics=central", "analytics.epsilon_label_histogram=null",
            "selection=noisy_max", "selection.epsilon=1.0", f"run_dir={tmp_path}"]
    stop = threading.Event()
    summary = run_federation(InProcessGrid(2), compose_config(base), [StopAfterRound2(stop)], stop=stop)
    assert summary["stop_reason"] == "interrupted" and summary["rounds_completed"] == 2
    assert not (tmp_path / DECISION).exists()
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert not [r for r in report["analytics"]["releases"] if r["label"] == "model selection"]
    assert "interrupted" in report["selection"]["deferred"]
    run_federation(InProcessGrid(2), compose_config([*base, "resume=true"]))
    decision = json.loads((tmp_path / DECISION).read_text())
    assert decision["validated_rounds"] == [1, 2, 3, 4]
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert [r["count"] for r in report["analytics"]["releases"] if r["label"] == "model selection"] == [1]


# ------------------------------------------------------------------ anonymisation and analytics without central DP


def test_anonymised_rows_with_analytics_but_no_central_dp_still_write_privacy_json(tmp_path, flower_run_identity):
    """privacy=none + anonymisation + analytics=central: the anonymisation section made a report without a delta,
    and the analytics took it for a central-DP one (KeyError 'delta' after the last round, no privacy.json)."""
    from conftest import InProcessGrid, shared_data_dir

    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation

    d = shared_data_dir()
    if d is None or not (d / "heart-disease").is_dir():
        pytest.skip("heart-disease data not found: set FEDPRIV_DATA to a folder with heart-disease/ "
                    "(CI uses ../shared/data)")
    rc = compose_config(["dataset=heart_disease", "anonymisation=heart_k5", f"data.root={d}", "tracking.progress=false",
                         "num_rounds=2", "analytics=central", "analytics.epsilon_label_histogram=1.0",
                         "analytics.epsilon_validation=0.5", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["epsilon"] == "inf" and report["analytics"]["epsilon"] == pytest.approx(1.0 + 2 * 0.5)
    assert report["anonymisation"]["k"] == 5
    assert summary["analytics_epsilon"] == pytest.approx(2.0) and "epsilon" not in summary
