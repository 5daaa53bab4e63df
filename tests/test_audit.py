"""Privacy audit: canary clients in a central-DP run, the one-shot estimate (Andrew et al.
2024), the Clopper-Pearson threshold bound, and Steinke et al.'s one-run bound.

Statistics are checked against independent computations (closed forms, numerical integration,
scipy's binomial, dp-accounting). The aggregator is driven directly, without Ray, on a linear toy
"model" (zero arrays of dimension d) with no real client: the canaries are the only signal, so
the released sum in a round is ``C * sum(sampled canaries) + N(0, (z C)^2 I)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import FakeGrid
from scipy import integrate, stats

from fedpriv.audit import (
    attach_audit,
    cosine_null_logsf,
    epsilon_lower_bound,
    gaussian_mechanism_epsilon,
    gaussian_pair_epsilon,
    one_run_audit,
    p_value,
    threshold_lower_bound,
)
from fedpriv.audit.one_shot import gaussian_pair_delta
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.privacy import PrivacyLedger
from fedpriv.updates import to_record
from strategies import build_aggregator


pytestmark = pytest.mark.usefixtures("flower_run_identity")


def drive(overrides: str, dim: int, rounds: int, noise_override: float | None = None, stop_after: int | None = None):
    """Run ``rounds`` rounds of the central-DP aggregator (canaries only); returns it and its report."""
    rc = compose_config(overrides + " privacy=central privacy.target_epsilon=null privacy.secure_rng=false audit=central")
    agg = build_aggregator(rc)
    if noise_override is not None:
        agg.mechanism.noise_scale = noise_override  # the noise actually drawn (what audit.noise_scale sets)
    rec = to_record({"w": np.zeros(dim, np.float32)})
    for t in range(1, rounds + 1):
        agg.begin_round(t, rec, FakeGrid())
        rec, metrics = agg.aggregate(t, rec, [])
        if stop_after == t:
            return agg, rec
    return agg, attach_audit(agg.privacy_report(), agg)


def fm(report):
    return report["audit"]["threat_models"]["final_model"]


def ar(report):
    return report["audit"]["threat_models"]["all_rounds"]


def all_lower_bounds(report):
    return [m[k]["epsilon"] for m in report["audit"]["threat_models"].values() for k in ("lower_bound", "one_run_lower_bound")]


# ---------------------------------------------------------------------------------- pure statistics
def test_gaussian_epsilon_matches_dp_accounting_and_numerical_integration():
    # Equal variances: mu-GDP, against dp-accounting's PLD of one Gaussian release (no sampling).
    for z in (0.7, 2.0):
        ledger = PrivacyLedger()
        ledger.record(z, 1.0, "all")
        assert gaussian_mechanism_epsilon(1 / z, 1e-5) == pytest.approx(ledger.epsilon(1e-5, "pld"), rel=2e-3)
        assert gaussian_pair_epsilon(1 / z, 1.0, 0.0, 1.0, 1e-5) == pytest.approx(gaussian_mechanism_epsilon(1 / z, 1e-5), rel=1e-4)
    # Unequal variances: the closed-form region against integrating (p - e^eps q)_+ numerically.
    for p, q, eps in (((1.2, 0.8), (0.0, 1.0), 1.0), ((0.5, 1.3), (0.0, 1.0), 0.7), ((2.0, 1.0), (0.0, 1.0), 3.0)):
        f = lambda x: max(stats.norm.pdf(x, *p) - math.exp(eps) * stats.norm.pdf(x, *q), 0.0)  # noqa: E731
        direct = integrate.quad(f, -30, 30, points=[-3, 0, 3], limit=400)[0]
        assert gaussian_pair_delta(eps, p, q) == pytest.approx(direct, rel=1e-5, abs=1e-12)


def test_exact_cosine_null():
    # In R^3 the cosine with a fixed vector is uniform on [-1, 1] (Archimedes): P(cos >= t) = (1 - t) / 2.
    for t in (-0.5, 0.0, 0.3, 0.9):
        assert math.exp(float(cosine_null_logsf(t, 3))) == pytest.approx((1 - t) / 2, rel=1e-9)
    # Variance exactly 1/d, and the far tail stays a (clamped) upper bound instead of -inf.
    d = 1000
    a = (d - 1) / 2
    assert stats.beta(a, a).var() * 4 == pytest.approx(1 / d, rel=1e-9)
    assert np.isfinite(cosine_null_logsf(0.9, 100_000))


def test_threshold_lower_bound_is_valid_and_finds_separated_canaries():
    rng = np.random.default_rng(0)
    mu = 1.0  # 1-GDP: epsilon 4.4 at delta 1e-5
    truth = gaussian_mechanism_epsilon(mu, 1e-5)
    x, y = rng.normal(mu, 1, 500), rng.normal(0, 1, 500)
    lb = threshold_lower_bound(x, y, 1e-5, 0.05)
    assert 0 <= lb["epsilon"] < truth
    far = threshold_lower_bound(rng.normal(20, 1, 500), rng.normal(0, 1, 500), 1e-5, 0.05)
    assert far["epsilon"] > 3.5  # ~log(500 / ln(1/alpha')) with 500 held-out samples
    exact = threshold_lower_bound(rng.normal(20, 1, 500), [], 1e-5, 0.05, null_log_fpr=lambda t: stats.norm.logsf(t))
    assert exact["epsilon"] > 50  # an exact null law needs no held-out samples


# ---------------------------------------------------------------------------------- Steinke et al.
def test_one_run_p_value_against_scipy_binomial():
    m, r, v, eps, delta = 1000, 200, 150, 0.8, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))
    assert p_value(eps, 0.0, m, r, v) == pytest.approx(stats.binom.sf(v - 1, r, q), rel=1e-12)
    # The delta term, directly: max_i P[v - i <= B < v] / i.
    alpha = max((stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - 1 - i, r, q)) / i for i in range(1, v + 1))
    assert p_value(eps, delta, m, r, v) == pytest.approx(stats.binom.sf(v - 1, r, q) + 2 * m * delta * alpha, rel=1e-9)
    # At eps = 0, delta = 0: a fair coin per guess.
    assert p_value(0.0, 0.0, m, r, v) == pytest.approx(stats.binom.sf(v - 1, r, 0.5), rel=1e-12)
    # The bound is where the p-value crosses beta.
    lb = epsilon_lower_bound(m, r, v, delta, 0.05)
    assert p_value(lb, delta, m, r, v) < 0.05 <= p_value(lb + 1e-4, delta, m, r, v)


def test_one_run_bound_large_for_perfect_guesses_zero_for_random_and_monotone():
    assert epsilon_lower_bound(10_000, 1000, 1000, 1e-5, 0.05) > 5.0
    assert epsilon_lower_bound(1000, 100, 50, 1e-5, 0.05) == 0.0  # half right: nothing
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in range(50, 101, 5)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:])) and bounds[-1] > bounds[0] + 2
    rng = np.random.default_rng(1)
    included = rng.random(2000) < 0.5
    random = one_run_audit(rng.random(2000), included, 1e-5, 0.95)
    assert random["epsilon"] < 0.2
    perfect = one_run_audit(included + 0.01 * rng.random(2000), included, 1e-5, 0.95)
    assert perfect["epsilon"] > 4.0


def test_one_run_bound_stays_below_the_true_epsilon_of_randomised_response():
    # Each canary's inclusion bit goes through eps-DP randomised response (eps = 1), the worst case
    # of the analysis: a valid 95% bound exceeds 1 in at most 5% of runs. 40 runs: P(Bin(40, 0.05)
    # >= 7) = 0.003, while an audit that ignored the confidence would exceed 1 in about half.
    eps = 1.0
    keep = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(2)
    bounds = []
    for _ in range(40):
        included = rng.random(2000) < 0.5
        out = np.where(rng.random(2000) < keep, included, ~included)
        bounds.append(one_run_audit(out + 0.01 * rng.random(2000), included, 1e-5, 0.95)["epsilon"])
    assert sum(b > eps for b in bounds) <= 6
    assert np.median(bounds) > 0.3  # and it does see the leak


# ---------------------------------------------------------------------------------- in a run
def test_noise_off_canaries_are_found():
    # Poisson sampling q = 0.3 over 4 rounds, no noise at all: canaries that took part stand out.
    _, rep = drive("num_clients=100 clients_per_round=30 num_rounds=4 privacy.noise_multiplier=1.0 audit.canaries=200",
                   dim=5000, rounds=4, noise_override=0.0)
    a = rep["audit"]
    assert a["accountant_epsilon_of_noise_drawn"] == math.inf
    assert fm(rep)["estimate"]["epsilon"] > 20 and ar(rep)["estimate"]["epsilon"] > 20
    assert fm(rep)["lower_bound"]["epsilon"] > 20  # exact null: a participating canary's cosine is ~50 null stds
    assert fm(rep)["one_run_lower_bound"]["epsilon"] > 1.0  # only 200 canaries: the one-run bound saturates
    assert a["privacy_bug"] and rep["summary"]["privacy_bug"]
    # Only a one-run bound carries the stated false-alarm rate (no independence of canaries assumed).
    assert a["privacy_bug_rigorous"] == any("one run lower bound" in r for r in a["privacy_bug_reasons"])
    assert "one_run_lower_bound" in a["false_alarm_rate"] and "independent" in a["false_alarm_rate"]
    assert rep["caveats"][0].startswith("WARNING privacy_bug")
    assert 0 < a["inserted_never_sampled"] < a["inserted"]  # Poisson: (1 - 0.3)^4 = 24% never joined


def test_heavy_noise_estimate_small_and_bounds_below_the_accountant():
    # z = 30, no sampling, 3 rounds: accountant epsilon ~ 0.19 (mu = sqrt(3)/30).
    _, rep = drive("num_clients=1000 clients_per_round=1000 sampling=all num_rounds=3 privacy.noise_multiplier=30 audit.canaries=1000",
                   dim=20000, rounds=3)
    eps = rep["epsilon"]
    assert 0.1 < eps < 0.3
    for bound in all_lower_bounds(rep):
        assert bound < eps
    # The equal-variance reading tracks mu; the two-variance estimate (the paper's) also reads the
    # fitted std's sampling error (relative 1/sqrt(2k) = 3% at k ~ 500) as leakage at delta=1e-5.
    assert fm(rep)["estimate"]["epsilon_equal_variance"] < 0.6
    assert fm(rep)["estimate"]["epsilon"] < 1.5
    assert not rep["audit"]["privacy_bug"] and rep["summary"]["privacy_bug"] is False


def test_no_sampling_linear_model_estimate_near_the_gaussian_mechanism():
    """One round, no sampling, z = 2/3: every inserted canary is in the sum, which is exactly the
    Gaussian mechanism with mu = C / (z C) = 1.5 (epsilon 7.05 at delta 1e-5, also the PLD
    accountant's figure). Tolerances, from the estimator's sampling distribution at k ~ 500
    inserted canaries (a Monte Carlo of 200 fits, documented in the README): the separation
    mean/null-std has standard error 1/sqrt(k) = 0.045 (3%) plus a -1% bias from the other canaries
    in ||Delta|| (k mu^2 / 2d): 10% is > 3 SE. The equal-variance epsilon moves ~6x the separation's
    error: 15%. The paper's two-variance epsilon has sd ~0.7 and a +0.7 small-k bias at k = 500: 35%.
    """
    agg, rep = drive("num_clients=1000 clients_per_round=1000 sampling=all num_rounds=1 privacy.noise_multiplier=0.6666667 audit.canaries=1000",
                     dim=25000, rounds=1)
    delta = rep["delta"]
    analytic = gaussian_mechanism_epsilon(1.5, delta)
    assert rep["epsilon"] == pytest.approx(analytic, rel=0.02)  # the accountant agrees with the closed form
    est = fm(rep)["estimate"]
    assert est["separation"] == pytest.approx(1.5, rel=0.10)
    assert est["epsilon_equal_variance"] == pytest.approx(analytic, rel=0.15)
    assert est["epsilon"] == pytest.approx(analytic, rel=0.35)
    assert est["null_std"] == pytest.approx(1 / math.sqrt(25000))
    for bound in all_lower_bounds(rep):  # a correct mechanism: every bound below the accountant
        assert bound < rep["epsilon"]
    assert rep["audit"]["held_out_null_check_pvalue"] > 1e-3  # held-out cosines follow the exact null
    assert agg.audit.participations[agg.audit.inserted].min() == 1


def test_broken_noise_is_caught():
    # The accountant assumes z = 3 over 2 rounds (epsilon ~ 1.9); the noise drawn is a tenth of that.
    _, rep = drive("num_clients=1000 clients_per_round=1000 sampling=all num_rounds=2 privacy.noise_multiplier=3 audit.canaries=400",
                   dim=20000, rounds=2, noise_override=0.1)
    claimed = rep["epsilon"]
    assert 1.0 < claimed < 3.0
    assert fm(rep)["lower_bound"]["epsilon"] > claimed
    assert fm(rep)["one_run_lower_bound"]["epsilon"] > claimed  # also without the independence assumption
    assert rep["audit"]["accountant_epsilon_of_noise_drawn"] > 10 * claimed
    assert rep["audit"]["privacy_bug"] and rep["summary"]["privacy_bug"]
    assert any("privacy_bug" in c for c in rep["summary"]["privacy_caveats"])  # printed by the launcher
    json.dumps(rep, default=str)  # privacy.json stays writable


def test_canaries_enter_before_the_noise_and_the_denominator_counts_them():
    # Noise off, no sampling: the released average is exactly C * sum(inserted u_i) / (N + k).
    agg, rec = drive("num_clients=50 clients_per_round=50 sampling=all num_rounds=2 privacy.noise_multiplier=1.0 privacy.clip_norm=0.5 audit.canaries=20",
                     dim=300, rounds=2, noise_override=0.0, stop_after=1)
    au = agg.audit
    k = au.num_inserted
    u = au.directions.combination(np.flatnonzero(au.inserted))
    np.testing.assert_allclose(rec["w"].numpy(), 0.5 * u / (50 + k), rtol=1e-5, atol=1e-9)


def test_audit_state_survives_a_checkpoint():
    over = "num_clients=40 clients_per_round=10 num_rounds=4 privacy.noise_multiplier=1.0 audit.canaries=30"
    agg, rec = drive(over, dim=500, rounds=4, stop_after=2)
    state = agg.state_dict()
    resumed = build_aggregator(compose_config(over + " privacy=central privacy.target_epsilon=null privacy.secure_rng=false audit=central"))
    resumed.load_state_dict(state)
    for a in (agg, resumed):  # the same two further rounds on both
        r = rec
        for t in (3, 4):
            a.begin_round(t, r, FakeGrid())
            r, _ = a.aggregate(t, r, [])
    s1, s2 = agg.audit.statistics(), resumed.audit.statistics()
    np.testing.assert_allclose(s1["final_model"], s2["final_model"], rtol=1e-6)
    np.testing.assert_allclose(s1["all_rounds"], s2["all_rounds"], rtol=1e-6)
    np.testing.assert_array_equal(agg.audit.participations, resumed.audit.participations)


def test_audit_config_is_checked():
    with pytest.raises(ConfigError, match="audit.enabled"):
        compose_config("audit=central")  # privacy none: nothing to audit
    with pytest.raises(ConfigError, match="audit.confidence"):
        compose_config("privacy=central audit=central audit.confidence=1.5")
    with pytest.raises(ConfigError, match="audit.noise_scale"):
        compose_config("privacy=central audit=central audit.noise_scale=-1")
    assert compose_config("privacy=central audit=broken").audit.noise_scale == 0.1  # the preset composes over central
    plain = build_aggregator(compose_config("privacy=central privacy.noise_multiplier=1.0 privacy.target_epsilon=null"))
    assert plain.audit is None and plain.mechanism.noise_scale == 1.0  # off by default


def test_example_canaries_memorised_without_dp_are_found_and_untrained_model_finds_nothing():
    import torch

    from fedpriv.audit.example_level import audit_examples, canary_scores, make_canaries, with_canaries

    can = make_canaries(200, (100,), 10, seed=0)
    x, y = with_canaries(np.zeros((0, 100), np.float32), np.zeros(0, np.int64), can)
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 10)
    untrained = audit_examples(canary_scores(model, can), can, 1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(60):  # full-batch, no clipping, no noise: memorises the included canaries (loss ~0.02)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    trained = audit_examples(canary_scores(model, can), can, 1e-5)
    assert trained["epsilon"] > 1.5 and untrained["epsilon"] < 0.5
