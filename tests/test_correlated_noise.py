"""DP-FTRL's tree aggregation and banded matrix factorization: the noise and the epsilon.

The noise each generator streams is checked against its closed-form covariance built here from
first principles (dyadic intervals; the Toeplitz square root of the prefix-sum matrix from binomial
coefficients); the epsilon of each mechanism's plan against an independent computation (the analytic
Gaussian of Balle & Wang 2018; Opacus's PRV accountant; dp-accounting's RDP tree event).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from scipy.linalg import toeplitz
from scipy.special import comb
from scipy.stats import norm

from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.privacy.correlated import BandedNoise, TreeNoise, banded_sqrt_coefficients, strategy_matrix, tree_nodes_released
from fedpriv.privacy.plan import make_noise_plan, plan_epsilons
from fedpriv.privacy.central import CentralGaussianMechanism, ClippingState
from fedpriv.sampling import ClientSampler

DIM = 60_000  # coordinates: independent samples of the per-round noise vector


def _draws(rng: np.random.Generator, sigma: float = 1.0):
    return lambda: {"x": rng.normal(0.0, sigma, size=DIM)}


def _stream(noise, rounds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([noise.next(t, _draws(rng))["x"] for t in range(1, rounds + 1)])  # rounds x DIM


def _assert_covariance(samples: np.ndarray, expected: np.ndarray) -> None:
    """Empirical covariance within 6 standard errors of the closed form, entry by entry."""
    empirical = samples @ samples.T / samples.shape[1]
    d = np.sqrt(np.diag(expected))
    stderr = np.sqrt((np.outer(d, d) ** 2 + expected ** 2) / samples.shape[1])
    assert np.all(np.abs(empirical - expected) <= 6 * stderr + 1e-12), np.max(np.abs(empirical - expected) / stderr)


# ---------------------------------------------------------------------------------------------- BandMF


def _sqrt_prefix_toeplitz(n: int) -> np.ndarray:
    """The Toeplitz lower-triangular matrix with k-th diagonal binom(2k, k) / 4^k."""
    first = np.array([comb(2 * k, k, exact=True) / 4 ** k for k in range(n)])
    return np.tril(toeplitz(first))


def test_banded_coefficients_are_the_square_root_of_prefix_sums_truncated_and_normalised():
    s = _sqrt_prefix_toeplitz(9)
    assert np.allclose(s @ s, np.tril(np.ones((9, 9))))  # S^2 = A: the square root of the prefix-sum matrix
    for bands in (1, 3, 9):
        expected = s[:bands, 0] / np.linalg.norm(s[:bands, 0])
        assert np.allclose(banded_sqrt_coefficients(bands), expected)
    assert np.allclose(banded_sqrt_coefficients(1), [1.0])  # one band: independent noise (DP-FedAvg)


@pytest.mark.parametrize("bands", [1, 3, 6])
def test_bandmf_noise_has_the_covariance_of_c_inverse_z(bands):
    rounds = 10
    c = np.tril(toeplitz(np.r_[banded_sqrt_coefficients(bands), np.zeros(rounds - bands)]))
    assert np.allclose(c, strategy_matrix(bands, rounds))
    c_inv = np.linalg.inv(c)
    samples = _stream(BandedNoise(banded_sqrt_coefficients(bands)), rounds)
    _assert_covariance(samples, c_inv @ c_inv.T)
    # and the release is exactly C^-1 z: C times the noises gives back i.i.d. draws of variance 1
    _assert_covariance(c @ samples, np.eye(rounds))


def test_bandmf_sensitivity_is_sqrt_k_only_when_participations_are_at_least_b_apart():
    bands, rounds = 4, 24
    c = strategy_matrix(bands, rounds)
    assert np.max(np.linalg.norm(c, axis=0)) == pytest.approx(1.0)  # one participation: sensitivity <= clip norm
    for group in range(bands):  # cyclic with G = b groups: rounds group, group + b, ...
        u = np.zeros(rounds)
        u[group::bands] = 1.0
        assert np.linalg.norm(c @ u) <= math.sqrt(u.sum()) + 1e-12
    u = np.zeros(rounds)
    u[0::bands - 1] = 1.0  # separated by b - 1 < b: the bands overlap and the sensitivity exceeds sqrt(k)
    assert np.linalg.norm(c @ u) > math.sqrt(u.sum()) * 1.05


# ------------------------------------------------------------------------------------------------ tree


def _dyadic_decomposition(r: int) -> list[tuple[int, int]]:
    """The intervals of r's binary expansion, e.g. 6 -> [1, 4], [5, 6]."""
    out, start = [], 1
    for level in range(r.bit_length() - 1, -1, -1):
        if r >> level & 1:
            out.append((start, start + 2 ** level - 1))
            start += 2 ** level
    return out


def _tree_covariance(epoch: int, rounds: int) -> np.ndarray:
    """Cov(w) with w_r = P_r - P_(r-1), P_r = the sum of r's dyadic nodes (one unit of variance each), per epoch."""
    cov = np.zeros((rounds, rounds))
    for start in range(0, rounds, epoch):
        n = min(epoch, rounds - start)
        nodes = [set(_dyadic_decomposition(r)) for r in range(0, n + 1)]
        prefix = np.array([[len(nodes[a] & nodes[b]) for b in range(n + 1)] for a in range(n + 1)], dtype=float)
        diff = np.zeros((n, n + 1))
        for r in range(1, n + 1):
            diff[r - 1, r], diff[r - 1, r - 1] = 1.0, -1.0
        cov[start:start + n, start:start + n] = diff @ prefix @ diff.T
    return cov


def test_tree_noise_has_the_covariance_of_dyadic_node_sums_and_restarts():
    epoch, rounds = 8, 13  # a restart at round 9
    samples = _stream(TreeNoise(epoch), rounds)
    _assert_covariance(samples, _tree_covariance(epoch, rounds))
    running = np.cumsum(samples[:epoch], axis=0)  # within the first tree the running-sum noise is log, not sqrt
    assert np.var(running[epoch - 1]) == pytest.approx(1.0, rel=0.05)  # round 8 = one node [1, 8]
    assert np.var(running[6]) == pytest.approx(3.0, rel=0.05)  # round 7 = [1, 4] + [5, 6] + [7, 7]


def test_released_nodes_holding_a_round_match_enumeration_and_dp_accounting():
    for position in range(1, 70):
        closed = [(a, b) for level in range(8) for a in range(1, position + 1, 2 ** level)
                  for b in [a + 2 ** level - 1] if b <= position]  # every dyadic node released by then
        worst = max(sum(a <= leaf <= b for a, b in closed) for leaf in range(1, position + 1))
        assert tree_nodes_released(position) == worst == math.ceil(math.log2(position + 1))


# ------------------------------------------------------------------------------------------ accounting


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang (2018): a Gaussian of sensitivity/std mu is (eps, delta)-DP exactly for
    delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2); solved for eps by bisection."""
    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def _plan(*overrides: str):
    return make_noise_plan(compose_config(["privacy=central", "privacy.delta=1e-5", "num_clients=1000", *overrides]))


@pytest.mark.parametrize("rounds,groups", [(40, 10), (37, 8), (5, 10)])
def test_tree_epsilon_is_the_analytic_gaussian_of_its_released_nodes(rounds, groups):
    plan = _plan("clients_per_round=100", f"num_rounds={rounds}", "sampling=cyclic", f"cyclic_groups={groups}",
                 "privacy.mechanism=tree", "privacy.target_epsilon=2")
    z = plan.noise_multipliers[0]
    trees = [min(groups, rounds - s) for s in range(0, rounds, groups)]
    nodes = sum(math.ceil(math.log2(n + 1)) for n in trees)
    exact = _analytic_gaussian_epsilon(math.sqrt(nodes) / z, 1e-5)
    ledger_eps = plan_epsilons(plan)[-1]
    assert exact <= ledger_eps <= exact * 1.01 + 1e-3  # PLD: an upper bound, and tight
    assert ledger_eps <= 2.0 * (1 + 1e-9) and ledger_eps >= 2.0 * 0.98  # calibrated to the target
    # dp-accounting's own tree event (RDP, looser; it states it under zero-out, which moves a node by the
    # same clip norm as adding or removing a client): never below the ledger's figure
    rdp = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    rdp.compose(dp_event.ComposedDpEvent([dp_event.SingleEpochTreeAggregationDpEvent(z, n) for n in trees]))
    assert rdp.get_epsilon(1e-5) >= ledger_eps


@pytest.mark.parametrize("groups,per_round", [(4, 100), (10, 50), (10, 100)])
def test_bandmf_epsilon_matches_opacus_prv_for_dp_sgd_over_ceil_t_over_g_steps(groups, per_round):
    from opacus.accountants import PRVAccountant

    rounds = 30
    plan = _plan(f"clients_per_round={per_round}", f"num_rounds={rounds}", "sampling=cyclic",
                 f"cyclic_groups={groups}", "privacy.mechanism=bandmf", "privacy.target_epsilon=2")
    z, q = plan.noise_multipliers[0], per_round * groups / 1000
    assert plan.sampling_rate == pytest.approx(q) and plan.bands == groups
    steps = math.ceil(rounds / groups)
    if q < 1:
        prv = PRVAccountant()
        prv.history = [(z, q, steps)]
        independent = prv.get_epsilon(1e-5, eps_error=0.005)
    else:  # every member of the group joins: k Gaussians = one of sensitivity sqrt(k)
        independent = _analytic_gaussian_epsilon(math.sqrt(steps) / z, 1e-5)
    assert plan_epsilons(plan)[-1] == pytest.approx(independent, rel=0.02, abs=0.01)


def test_tree_epsilon_after_every_round_is_the_analytic_gaussian_of_the_nodes_released_so_far():
    """What the budget stop reads mid-run: after position r of a tree, floor(log2 r) + 1 nodes per finished tree."""
    plan = _plan("clients_per_round=100", "num_rounds=23", "sampling=cyclic", "cyclic_groups=10",
                 "privacy.mechanism=tree", "privacy.noise_multiplier=3", "privacy.target_epsilon=null")
    for t, eps in enumerate(plan_epsilons(plan), start=1):
        nodes = (t // 10) * 4 + (len(bin(t % 10)) - 2 if t % 10 else 0)  # 4 nodes in a tree of 10; floor(log2 r) + 1
        exact = _analytic_gaussian_epsilon(math.sqrt(nodes) / 3, 1e-5)
        assert exact <= eps <= exact * 1.01 + 1e-3, t


# ---------------------------------------------------------------------------------------------- sampler


def test_cyclic_sampler_draws_only_the_rounds_group_at_rate_q():
    sampler = ClientSampler("cyclic", 1003, 50, seed=3, groups=4)
    assert sampler.rate == pytest.approx(200 / 1003)
    counts = np.zeros(1003)
    for t in range(1, 4 * 400 + 1):
        cohort = sampler.sample(t)
        assert np.all(cohort % 4 == (t - 1) % 4) and len(set(cohort)) == len(cohort) and cohort.max() < 1003
        counts[cohort] += 1
    freq = counts / 400  # each client had 400 chances
    assert abs(freq.mean() - sampler.rate) < 0.01 and freq.std() < 0.06
    whole = ClientSampler("cyclic", 30, 10, seed=None)  # default groups: 3, q = 1
    assert [list(whole.sample(t)) for t in (1, 2, 4)] == [list(range(0, 30, 3)), list(range(1, 30, 3)),
                                                          list(range(0, 30, 3))]


# ---------------------------------------------------------------------------------------- the mechanism


def _mechanism(mechanism: str) -> CentralGaussianMechanism:
    plan = _plan("clients_per_round=100", "num_rounds=6", "sampling=cyclic", "cyclic_groups=4",
                 f"privacy.mechanism={mechanism}", "privacy.noise_multiplier=2", "privacy.target_epsilon=null")
    return CentralGaussianMechanism(plan, ClippingState(norm=0.5, adaptive=False), secure_rng=False, seed=5)


@pytest.mark.parametrize("mechanism", ["bandmf", "tree"])
def test_a_resumed_mechanism_continues_the_same_noise_and_the_last_checkpoint_drops_it(mechanism):
    zero = {"x": np.zeros(5000)}
    straight = _mechanism(mechanism)
    outs = [straight.release_sum(t, zero, [1.0], [0.1], zero).noised_mean["x"] for t in range(1, 7)]
    first = _mechanism(mechanism)
    for t in range(1, 4):
        first.release_sum(t, zero, [1.0], [0.1], zero)
    resumed = _mechanism(mechanism)
    resumed.load_state_dict(first.state_dict())
    again = [resumed.release_sum(t, zero, [1.0], [0.1], zero).noised_mean["x"] for t in range(4, 7)]
    assert all(np.array_equal(a, b) for a, b in zip(outs[3:], again))
    assert straight.state_dict()["noise_stream"] is None  # after the last planned round: nothing to leak
    assert first.state_dict()["noise_stream"] is not None
    # per round, the noise on the sum is the stream's: std z*C*sqrt(Cov_tt), divided by E[m] = 100
    cov = (_tree_covariance(4, 6) if mechanism == "tree"
           else np.linalg.inv(strategy_matrix(4, 6)) @ np.linalg.inv(strategy_matrix(4, 6)).T)
    for t, out in enumerate(outs):
        assert np.std(out * 100) == pytest.approx(2 * 0.5 * math.sqrt(cov[t, t]), rel=0.05)
    metric = _mechanism(mechanism)  # the published noise_std is that marginal, not the draws' z * C / E[m]
    for t in range(1, 7):
        published = metric.release_sum(t, zero, [1.0], [0.1], zero).metrics["noise_std"]
        assert published == pytest.approx(2 * 0.5 * math.sqrt(cov[t - 1, t - 1]) / 100, rel=1e-9)
    broken = _mechanism(mechanism)
    with pytest.raises(ValueError, match="no correlated noise state"):
        broken.load_state_dict({**first.state_dict(), "noise_stream": None})


@pytest.mark.parametrize("overrides,key", [
    (["privacy.mechanism=tree"], "sampling"),
    (["privacy.mechanism=bandmf", "sampling=fixed"], "sampling"),
    (["privacy.mechanism=bandmf", "sampling=cyclic", "cyclic_groups=4", "privacy.bands=5"], "privacy.bands"),
    (["privacy.mechanism=tree", "sampling=cyclic", "privacy.clipping=adaptive"], "privacy.clipping"),
    (["sampling=cyclic", "cyclic_groups=30"], "cyclic_groups"),
    (["sampling=cyclic", "schedule=linear"], "schedule.name"),
    (["privacy.mechanism=matrix"], "privacy.mechanism"),
    (["privacy.mechanism=tree", "sampling=cyclic", "privacy.noise_sampler=opendp"], "privacy.noise_sampler"),
    (["sampling=cyclic", "client_mode=nodes"], "sampling"),
])
def test_a_mechanism_whose_assumptions_do_not_hold_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        compose_config(["privacy=central", "num_clients=100", "clients_per_round=10", "num_rounds=5", *overrides])


@pytest.mark.parametrize("mechanism", ["bandmf", "tree"])
def test_an_end_to_end_run_spends_and_reports_what_its_plan_says(tmp_path, flower_run_identity, mechanism):
    """Through the engine and workers' shares: the cyclic cohorts, the correlated noise, privacy.json."""
    import json

    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    over = ["num_clients=24", "clients_per_round=6", "num_rounds=5", "privacy=central", "sampling=cyclic",
            f"privacy.mechanism={mechanism}", "privacy.target_epsilon=4", "privacy.delta=1e-5",
            "tracking.progress=false", f"run_dir={tmp_path}"]
    rc = compose_config(over)
    summary = run_federation(InProcessGrid(2), rc)
    z = make_noise_plan(rc).noise_multipliers[0]
    # 4 groups of 6, q = 1: bandmf = 2 Gaussians (rounds 1, 5); tree = nodes 1, 2, 4 of the first tree + 1 of the second
    nodes = 2 if mechanism == "bandmf" else 4
    independent = _analytic_gaussian_epsilon(math.sqrt(nodes) / z, 1e-5)
    assert independent <= summary["epsilon"] <= independent * 1.01 + 1e-3 and summary["epsilon"] <= 4.0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["mechanism"]["name"] == mechanism and report["sampling"]["scheme"] == "cyclic"
    assert "cyclic" in report["guarantee"] and any("correlated" in c for c in report["caveats"])
    rows = [json.loads(line) for line in (tmp_path / "operator_only" / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["cohort_size"] for r in rows] == [6] * 5  # 4 groups of 6, q = 1: each whole group in turn


@pytest.mark.parametrize("mechanism,noise", [("gaussian", None), ("bandmf", 3), ("tree", 4)])
def test_running_sum_noise_closed_forms_match_the_streams(mechanism, noise):
    from fedpriv.privacy.correlated import running_sum_noise

    rounds = 11
    if mechanism == "gaussian":
        samples = np.random.default_rng(0).normal(size=(rounds, DIM))
        expected = running_sum_noise("gaussian", rounds)
    elif mechanism == "bandmf":
        samples = _stream(BandedNoise(banded_sqrt_coefficients(noise)), rounds)
        expected = running_sum_noise("bandmf", rounds, bands=noise)
    else:
        samples = _stream(TreeNoise(noise), rounds)
        expected = running_sum_noise("tree", rounds, epoch=noise)
    assert np.allclose(np.std(np.cumsum(samples, axis=0), axis=1), expected, rtol=0.02)


def test_mechanism_noise_script_calibrates_every_mechanism_to_the_target(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "mechanism_noise.py"
    spec = importlib.util.spec_from_file_location("mechanism_noise", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["privacy=central", "num_clients=1000", "clients_per_round=100", "num_rounds=20",
                        "privacy.target_epsilon=2", "privacy.delta=1e-5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 7  # gaussian poisson + 3 mechanisms x groups {2, 10}
    epsilons = [float(r[-3]) for r in rows]
    assert all(1.96 <= e <= 2.0 for e in epsilons)
    last = {" ".join(r[:-5]): float(r[-2]) for r in rows}
    z_gauss = float(rows[[" ".join(r[:-5]) for r in rows].index("gaussian, poisson")][-4])
    assert last["gaussian, poisson"] == pytest.approx(z_gauss * math.sqrt(20) / 100, rel=1e-3)
    assert script.main(["privacy=central", "privacy.mechanism=tree"]) == 2  # refused: tree needs cyclic


def test_a_budget_stop_drops_the_noise_state_and_a_finished_run_loads_without_it():
    plan = _plan("clients_per_round=100", "num_rounds=20", "sampling=cyclic", "cyclic_groups=4",
                 "privacy.mechanism=tree", "privacy.noise_multiplier=5", "privacy.target_epsilon=1.2")
    mech = CentralGaussianMechanism(plan, ClippingState(norm=1.0, adaptive=False), secure_rng=False, seed=1)
    zero = {"x": np.zeros(10)}
    t = 1
    while mech.stop_reason(t) is None:
        mech.release_sum(t, zero, [1.0], [0.1], zero)
        t += 1
        if mech.stop_reason(t) is None:  # the run goes on: its checkpoint must carry the noise drawn so far
            assert mech.state_dict()["noise_stream"]["rounds"] == t - 1
    assert 1 < t <= 20 and "budget" in mech.stop_reason(t)  # stopped by the budget, not the plan
    state = mech.state_dict()
    assert state["noise_stream"] is None  # nothing can follow: the secret noise is not kept
    again = CentralGaussianMechanism(plan, ClippingState(norm=1.0, adaptive=False), secure_rng=False, seed=1)
    again.load_state_dict(state)  # a finished run resumes (to write its outputs) without it
    assert again.rounds == t - 1


def test_canaries_follow_the_cyclic_groups():
    from fedpriv.audit.canaries import CanaryAudit

    plan = _plan("clients_per_round=250", "num_rounds=8", "sampling=cyclic", "cyclic_groups=4",
                 "privacy.mechanism=bandmf", "privacy.noise_multiplier=2", "privacy.target_epsilon=null")
    assert plan.sampling_rate == 1.0
    audit = CanaryAudit(40, plan.sampling, plan.sampling_rate, seed=3, plan=plan)
    total = {"x": np.zeros(50)}
    for t in range(1, 9):
        before = audit.participations.copy()
        audit.add_canaries(t, total, 1.0)
        joined = np.flatnonzero(audit.participations > before)
        inserted_in_group = np.flatnonzero(audit.inserted & (np.arange(40) % 4 == (t - 1) % 4))
        assert np.array_equal(joined, inserted_in_group)  # q = 1: every inserted canary of the round's group, no other
    assert audit.expected_per_round == pytest.approx(audit.num_inserted / 4)
