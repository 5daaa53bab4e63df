"""Central DP strategy: the noise actually added, clipping, adaptive clipping, budget, accounting.

Every figure is checked against an independent computation (closed forms, dp-accounting called
directly), never against the strategy's own arithmetic.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import FakeGrid
from dp_accounting import dp_event, pld
from flwr.app import Message, MetricRecord, RecordDict

from clients.local_update import clip_update_on_client
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.aggregation import Stop
from fedpriv.updates import IntegerBufferError, to_record
from fedpriv.privacy import accounting
from fedpriv.privacy.central import CentralGaussianMechanism, ClippingState
from fedpriv.privacy.plan import make_noise_plan
from strategies import build_aggregator
from strategies.aggregator import FlowerAggregator
from strategies.central_dp import CentralDPAggregator
from strategies.factory import build_flower_strategy


pytestmark = pytest.mark.usefixtures("flower_run_identity")


def reply(arrays: dict[str, np.ndarray], **metrics: float) -> Message:
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": 10.0, "train_loss": 0.5, **metrics})})
    return Message(content, dst_node_id=1, message_type="train")


def make_agg(overrides: str) -> CentralDPAggregator:
    rc = compose_config(overrides)
    agg = build_aggregator(rc)
    assert isinstance(agg, CentralDPAggregator)
    return agg


def model_arrays(n: int, value: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.full(n, value, dtype=np.float32), "b": np.full(8, value, dtype=np.float32)}


@pytest.mark.parametrize("sampler", ["numpy-seeded", "numpy", "opendp"])
def test_noise_std_matches_z_c_over_expected_cohort_on_a_large_model(sampler):
    # 200k parameters (50k for OpenDP's slower exact sampler), no client update at all: what comes
    # back is pure noise / E[m].
    rng_keys = {"numpy-seeded": "privacy.secure_rng=false", "numpy": "", "opendp": "privacy.noise_sampler=opendp"}
    agg = make_agg("num_clients=100 clients_per_round=10 privacy=central privacy.noise_multiplier=1.3 "
                   f"privacy.clip_norm=0.5 {rng_keys[sampler]}")
    assert agg.privacy_report()["randomness"]["noise"].startswith("OpenDP" if sampler == "opendp" else "numpy")
    zeros = model_arrays(50_000 if sampler == "opendp" else 200_000)
    agg.begin_round(1, to_record(zeros), FakeGrid())
    new, metrics = agg.aggregate(1, to_record(zeros), [reply(zeros) for _ in range(7)])  # 7 of E[m]=10 replied
    noise = np.concatenate([v.numpy().ravel() for v in new.values()]).astype(np.float64)
    expected_std = 1.3 * 0.5 / 10  # z * C / E[m], whatever the number of replies
    assert abs(noise.std() / expected_std - 1) < 0.02
    assert abs(noise.mean()) < 4 * expected_std / math.sqrt(noise.size)
    assert metrics["noise_multiplier"] == pytest.approx(1.3)


def test_updates_are_clipped_unweighted_and_divided_by_the_expected_cohort():
    agg = make_agg("num_clients=40 clients_per_round=4 privacy=central privacy.noise_multiplier=1.0 privacy.clip_norm=1.0 privacy.secure_rng=false")
    agg.mechanism.noise_scale = 0.0  # look at the signal alone
    base = model_arrays(3)
    big = {"w": np.array([30.0, 40.0, 0.0], np.float32), "b": np.zeros(8, np.float32)}  # norm 50 -> scaled to 1
    small = {"w": np.array([0.3, 0.0, 0.0], np.float32), "b": np.zeros(8, np.float32)}  # norm 0.3, kept
    agg.begin_round(1, to_record(base), FakeGrid())
    # Example counts differ wildly: an unweighted estimator ignores them.
    new, metrics = agg.aggregate(1, to_record(base), [reply(big, **{"num-examples": 5000.0}), reply(small, **{"num-examples": 1.0})])
    w = new["w"].numpy()
    np.testing.assert_allclose(w, [(0.6 + 0.3) / 4, 0.8 / 4, 0.0], atol=1e-6)
    assert metrics["clipped_fraction"] == pytest.approx(0.5)


def test_zero_update_is_fine_and_integer_buffers_are_refused():
    agg = make_agg("num_clients=10 clients_per_round=5 privacy=central privacy.noise_multiplier=1.0 privacy.secure_rng=false")
    base = model_arrays(4)
    agg.begin_round(1, to_record(base), FakeGrid())
    agg.aggregate(1, to_record(base), [reply(base)])  # norm 0: no ZeroDivisionError
    with_counter = {**base, "bn.num_batches_tracked": np.array([3], dtype=np.int64)}
    agg.begin_round(2, to_record(with_counter), FakeGrid())
    with pytest.raises(IntegerBufferError, match="num_batches_tracked"):
        agg.aggregate(2, to_record(with_counter), [reply(with_counter)])


def _adaptive(norm: float, updates_norm: float, rounds: int = 6) -> list[float]:
    agg = make_agg(
        f"num_clients=20 clients_per_round=10 privacy=central privacy.noise_multiplier=1.0 privacy.target_epsilon=null privacy.clipping=adaptive "
        f"privacy.clip_norm={norm} privacy.secure_rng=false"
    )
    base = model_arrays(4)
    upd = {"w": np.array([updates_norm, 0, 0, 0], np.float32), "b": np.zeros(8, np.float32)}
    norms = []
    for t in range(1, rounds + 1):
        agg.begin_round(t, to_record(base), FakeGrid())
        agg.aggregate(t, to_record(base), [reply(upd) for _ in range(10)])
        norms.append(agg.mechanism.clipping.norm)
    return norms


def test_adaptive_norm_grows_when_everything_is_clipped_and_shrinks_when_nothing_is():
    grows = _adaptive(0.1, 5.0)
    assert grows[-1] > 0.1 * 1.5 and all(b > a for a, b in zip(grows, grows[1:]))
    shrinks = _adaptive(10.0, 0.01)
    assert shrinks[-1] < 10.0 / 1.5 and all(b < a for a, b in zip(shrinks, shrinks[1:]))


def test_adaptive_round_is_noised_with_the_norm_it_clipped_with():
    agg = make_agg(
        "num_clients=20 clients_per_round=10 privacy=central privacy.noise_multiplier=1.0 privacy.clipping=adaptive "
        "privacy.clip_norm=0.1 privacy.secure_rng=false"
    )
    zeros = model_arrays(50_000)
    agg.begin_round(1, to_record(zeros), FakeGrid())
    upd = {"w": np.zeros(50_000, np.float32), "b": np.ones(8, np.float32)}  # norm 2.8 > 0.1: all clipped
    new, metrics = agg.aggregate(1, to_record(zeros), [reply(upd) for _ in range(10)])
    sigma_b = agg.mechanism.clipping.count_stddev
    assert sigma_b > 0.5  # E[m]/20 = 0.5 would leave no room for z=1: the default is raised
    z_update = (1.0 ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert metrics["clip_norm"] == 0.1 and agg.mechanism.clipping.norm > 0.1  # next round's norm moved
    noise = new["w"].numpy().astype(np.float64)
    assert abs(noise.std() / (z_update * 0.1 / 10) - 1) < 0.03


def test_adaptive_count_noise_too_small_for_the_total_is_refused_early():
    with pytest.raises((ConfigError, ValueError)):
        build_aggregator(compose_config(
            "num_clients=20 clients_per_round=10 privacy=central privacy.noise_multiplier=5.0 privacy.clipping=adaptive "
            "privacy.clipped_count_stddev=0.1"
        ))


def test_client_side_clipping_gives_the_same_aggregate():
    base = model_arrays(3)
    trained = {"w": np.array([3.0, 4.0, 0.0], np.float32), "b": np.zeros(8, np.float32)}
    sent, unclipped = clip_update_on_client(base, trained, 1.0)
    assert unclipped == 0.0
    np.testing.assert_allclose(sent["w"], [0.6, 0.8, 0.0], atol=1e-6)
    results = []
    for clip_on, arrays in (("server", trained), ("client", sent)):
        agg = make_agg(f"num_clients=10 clients_per_round=2 privacy=central privacy.noise_multiplier=1.0 privacy.clip_on={clip_on} privacy.secure_rng=false")
        agg.mechanism.noise_scale = 0.0
        extra = agg.begin_round(1, to_record(base), FakeGrid())
        assert ("clip-norm" in extra) == (clip_on == "client")
        new, _ = agg.aggregate(1, to_record(base), [reply(arrays, unclipped=unclipped)])
        results.append(new["w"].numpy())
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


def _pld_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


def test_ledger_of_a_run_matches_dp_accounting_and_the_budget_stops_the_run():
    agg = make_agg("num_clients=100 clients_per_round=10 num_rounds=4 privacy=central privacy.noise_multiplier=0.8 privacy.target_epsilon=50 privacy.secure_rng=false")
    base = model_arrays(4)
    for t in (1, 2, 3):
        agg.begin_round(t, to_record(base), FakeGrid())
        _, metrics = agg.aggregate(t, to_record(base), [reply(base)])
    independent = _pld_epsilon(0.8, 0.1, 3, 1e-5)
    assert metrics["epsilon"] == pytest.approx(independent, rel=0.02)
    assert metrics["epsilon"] >= independent * 0.999  # never below the independent figure
    # A budget below what round 4 would spend stops the run before it.
    agg.plan.target_epsilon = metrics["epsilon"] * 1.001
    stop = agg.begin_round(4, to_record(base), FakeGrid())
    assert isinstance(stop, Stop) and "budget" in stop.reason


def test_target_epsilon_inf_clips_without_noise_and_reports_no_guarantee():
    """The reference point of an epsilon sweep: clipped, unweighted, not noised; epsilon inf, said so."""
    agg = make_agg("num_clients=40 clients_per_round=4 num_rounds=3 privacy=central privacy.target_epsilon=inf privacy.clip_norm=1.0")
    base = model_arrays(3)
    big = {"w": np.array([30.0, 40.0, 0.0], np.float32), "b": np.zeros(8, np.float32)}  # norm 50 -> scaled to 1
    agg.begin_round(1, to_record(base), FakeGrid())
    new, metrics = agg.aggregate(1, to_record(base), [reply(big)])
    np.testing.assert_allclose(new["w"].numpy(), [0.6 / 4, 0.8 / 4, 0.0], atol=1e-6)  # no noise at all
    assert metrics["noise_multiplier"] == 0.0 and math.isinf(metrics["epsilon"])
    report = agg.privacy_report()
    assert math.isinf(report["summary"]["epsilon"])
    assert any("NOT noised" in c for c in report["caveats"])


def test_calibrated_target_is_reached_within_one_percent():
    rc = compose_config("num_clients=1000 clients_per_round=100 num_rounds=20 privacy=central privacy.target_epsilon=4")
    agg = build_aggregator(rc)
    z = agg.plan.noise_multipliers[0]
    eps = _pld_epsilon(z, 0.1, 20, agg.plan.delta)
    assert 0.99 * 4 <= eps <= 4 * 1.001


def test_impossible_requests_fail_before_the_first_round():
    with pytest.raises(ConfigError, match="privacy.delta"):
        build_aggregator(compose_config("num_clients=100 clients_per_round=10 privacy=central privacy.delta=0.02"))
    with pytest.raises(ConfigError, match="target_epsilon"):
        build_aggregator(compose_config("num_clients=10 clients_per_round=10 sampling=all num_rounds=50 privacy=central privacy.target_epsilon=0.0001"))
    with pytest.raises(ConfigError, match="privacy"):
        build_aggregator(compose_config("privacy=central privacy.target_epsilon=null"))


def test_plain_strategy_is_flowers_weighted_average():
    rc = compose_config("")
    agg = FlowerAggregator(build_flower_strategy(rc))
    base = model_arrays(2)
    agg.begin_round(1, to_record(base), FakeGrid())
    a = {"w": np.array([1.0, 1.0], np.float32), "b": np.zeros(8, np.float32)}
    b = {"w": np.array([4.0, 4.0], np.float32), "b": np.zeros(8, np.float32)}
    new, _ = agg.aggregate(1, to_record(base), [reply(a, **{"num-examples": 3.0}), reply(b, **{"num-examples": 1.0})])
    np.testing.assert_allclose(new["w"].numpy(), [1.75, 1.75])


def test_final_report_of_an_unnoised_run_says_there_is_no_guarantee():
    """summary.json holds epsilon inf as the string "inf"; the last lines of the run must still print."""
    from fedpriv.launch import final_report

    rc = compose_config("privacy=central privacy.target_epsilon=inf run_dir=/tmp/x")
    summary = json.loads(json.dumps({"rounds_completed": 2, "rounds_planned": 2, "stop_reason": "completed", "final_accuracy": 0.5,
                                     "wall_seconds": 1.0, "epsilon": "inf", "delta": 1e-5, "accountant": "pld", "sampling": "poisson"}))
    text = final_report(summary, rc)
    assert "epsilon inf (NO privacy guarantee) at delta 1.00e-05" in text
    summary["epsilon"] = 7.9591
    assert "epsilon 7.959 at delta" in final_report(summary, rc)


def _share(deltas: list[dict[str, np.ndarray]], clip_norm: float) -> Message:
    """A worker's reply for several clients, as clients.cohort builds it: the clipped sum."""
    from fedpriv import updates

    total = {k: np.zeros(v.shape) for k, v in deltas[0].items()}
    bits, norms = [], []
    for d in deltas:
        clipped, norm, was = updates.clip({k: v.astype(np.float64) for k, v in d.items()}, clip_norm)
        total = updates.add(total, clipped)
        bits.append(0.0 if was else 1.0)
        norms.append(norm)
    content = RecordDict({
        "arrays": to_record(total),
        "metrics": MetricRecord({"num-examples": float(len(deltas)), "clients-trained": len(deltas),
                                 "clients-failed": 0, "clients-declined": 0, "clients-rejected": 0,
                                 "clipped-sum": 1.0}),
        "diagnostics": MetricRecord({"unclipped": bits, "update-norms": norms, "train-losses": []}),
    })
    return Message(content, dst_node_id=1, message_type="train")


def test_a_workers_clipped_sum_releases_what_the_clients_own_replies_would():
    """The same clients, as three replies or as one worker's share: the same release and figures."""
    rng = np.random.default_rng(3)
    base = model_arrays(50)
    deltas = [{k: rng.normal(0, s, v.shape).astype(np.float32) for k, v in base.items()} for s in (0.01, 0.5, 2.0)]
    results = []
    for as_share in (False, True):
        agg = make_agg("num_clients=40 clients_per_round=4 privacy=central privacy.noise_multiplier=1.0 "
                       "privacy.clipping=adaptive privacy.secure_rng=false")
        agg.mechanism.noise_scale = 0.0  # compare the signal; the noise is the same code either way
        agg.begin_round(1, to_record(base), FakeGrid())
        replies = ([_share(deltas, agg.mechanism.round_clip_norm)] if as_share
                   else [reply({k: base[k] + d[k] for k in base}) for d in deltas])
        assert all(agg.reply_problem(m, base) is None for m in replies)
        new, metrics = agg.aggregate(1, to_record(base), replies)
        results.append((new.to_torch_state_dict(), metrics, agg.mechanism.clipping.norm))
    (a, ma, na), (b, mb, nb) = results
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-7)
    for key in ("epsilon", "noise_std", "clip_norm", "cohort_size", "update_norm_p50"):
        assert ma[key] == pytest.approx(mb[key])
    assert na == pytest.approx(nb)  # adaptive clipping moved the norm the same way


def test_an_end_to_end_run_reports_the_epsilon_dp_accounting_computes(tmp_path, flower_run_identity):
    """Through the engine and workers' shares: the run's epsilon against dp-accounting's PLD."""
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    rc = compose_config(["num_clients=20", "clients_per_round=5", "num_rounds=3", "privacy=central",
                         "privacy.noise_multiplier=0.9", "privacy.target_epsilon=null", "privacy.delta=1e-5",
                         "tracking.progress=false", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    independent = _pld_epsilon(0.9, 0.25, 3, 1e-5)
    assert summary["epsilon"] >= independent * 0.999  # never below the independent figure
    assert summary["epsilon"] == pytest.approx(independent, rel=0.02)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["epsilon"] == summary["epsilon"] and report["delta"] == 1e-5


@pytest.mark.parametrize("target", ["null", "4"])
def test_epsilons_computed_while_a_round_trains_are_the_accountants_own(target):
    """prefetch_epsilons computes, on a thread, the figures the next release and budget check ask for:
    each round's reported epsilon is dp-accounting's PLD of the rounds so far (composed here by hand),
    and the server's own calls find them in the accountant's cache."""
    plan = make_noise_plan(compose_config(["privacy=central", "privacy.delta=1e-5", "num_clients=1000",
                                           "clients_per_round=50", "num_rounds=5", "sampling=poisson",
                                           "privacy.noise_multiplier=1.3", f"privacy.target_epsilon={target}"]))
    mech = CentralGaussianMechanism(plan, ClippingState(norm=1.0, adaptive=False), secure_rng=False, seed=3)
    zero = {"w": np.zeros(4)}
    accounting.epsilon.cache_clear()
    for t in range(1, 6):
        assert mech.stop_reason(t) is None
        mech.start_round()
        mech.prefetch_epsilons(t)
        mech.await_prefetch()  # the round's training, here: nothing, so that the cache is filled first
        misses = accounting.epsilon.cache_info().misses
        release = mech.release_sum(t, zero, [1.0], [0.5], zero)
        assert accounting.epsilon.cache_info().misses == misses  # the server's call was a cache hit
        by_hand = pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=1.3, sampling_prob=0.05, pessimistic_estimate=True,
            value_discretization_interval=1e-3).self_compose(t)
        assert release.metrics["epsilon"] == pytest.approx(by_hand.get_epsilon_for_delta(1e-5), rel=1e-9)
