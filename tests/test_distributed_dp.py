"""Distributed DP's parts: the Skellam accountant against independent computations, the encoding's
exactness, and SecAgg+'s masking, dropout recovery and refusals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats
from scipy.special import logsumexp

from fedpriv import secagg
from fedpriv.privacy import distributed, skellam
from fedpriv.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer


# ------------------------------------------------------------------------- the Skellam accountant


def exact_skellam_renyi(order: int, shift: int, variance: float) -> float:
    """D_order(Sk + shift || Sk) of a one-dimensional Skellam of ``variance``, summed over its support."""
    width = int(40 * math.sqrt(variance)) + 40 + abs(shift)
    k = np.arange(-width, width + 1)
    log_p = stats.skellam.logpmf(k - shift, variance / 2, variance / 2)
    log_q = stats.skellam.logpmf(k, variance / 2, variance / 2)
    both = np.isfinite(log_p) & np.isfinite(log_q)  # beyond, both underflow: the terms are below 1e-300
    assert both[width - 5 * int(math.sqrt(variance) + 1): width + 5 * int(math.sqrt(variance) + 1)].all()
    return float(logsumexp(order * log_p[both] + (1 - order) * log_q[both]) / (order - 1))


@pytest.mark.parametrize("variance", [4.0, 30.0, 400.0])
@pytest.mark.parametrize("order", [2, 5, 16])
def test_the_skellam_rdp_bound_holds_over_the_exact_divergence_and_is_close(order, variance):
    for shift in (1, 3):
        exact = exact_skellam_renyi(order, shift, variance)
        bound = skellam.skellam_rdp(order, shift, shift, variance)
        assert exact <= bound * (1 + 1e-9)
        if variance >= 400:
            assert bound <= 1.1 * exact  # tight where the noise dominates the shift


def test_the_bound_holds_for_vectors_where_coordinates_compose():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.integers(-3, 4, size=6)
        exact = sum(exact_skellam_renyi(4, int(s), 20.0) for s in x if s)
        bound = skellam.skellam_rdp(4, float(np.linalg.norm(x)), float(np.abs(x).sum()), 20.0)
        assert exact <= bound * (1 + 1e-9)


def test_with_the_gaussians_rdp_the_subsampling_bound_is_dp_accountings_subsampled_gaussian():
    """At integer orders the bound is the binomial expansion that dp-accounting computes for the
    Poisson-subsampled Gaussian (Mironov et al. 2019): equal, not merely above."""
    for sigma, q in ((1.5, 0.05), (0.8, 0.3), (3.0, 0.5)):
        orders = [2, 3, 4, 8, 16, 32]
        base = [0.0, 0.0] + [j / (2 * sigma ** 2) for j in range(2, max(orders) + 1)]
        exact = rdp_lib._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
        for a, e in zip(orders, exact):
            assert skellam.subsampled_rdp(a, q, base) == pytest.approx(e, rel=1e-9)
    assert skellam.subsampled_rdp(8, 1.0, base) == base[8]


def _logpmfs(shift, variance):
    width = int(40 * math.sqrt(variance)) + 40 + abs(shift)
    k = np.arange(-width, width + 1)
    log_p = stats.skellam.logpmf(k - shift, variance / 2, variance / 2)
    log_q = stats.skellam.logpmf(k, variance / 2, variance / 2)
    both = np.isfinite(log_p) & np.isfinite(log_q)
    return log_p[both], log_q[both]


def _renyi(order, log_p, log_q):
    return float(logsumexp(order * log_p + (1 - order) * log_q) / (order - 1))


@pytest.mark.parametrize("variance, shift", [(1.0, 1), (4.0, 2), (30.0, 5), (200.0, 1)])
@pytest.mark.parametrize("q", [0.01, 0.2, 0.9])
def test_the_subsampling_bound_holds_over_the_exact_subsampled_skellam_both_ways(variance, shift, q):
    """A one-dimensional Skellam run on a Poisson(q) sample, summed over its support: the divergence of
    the mixture from the noise alone (a user removed) and of the noise from the mixture (a user added)
    both stay under the bound computed from the exact base divergences."""
    log_p, log_q = _logpmfs(shift, variance)
    log_mix = np.logaddexp(math.log1p(-q) + log_q, math.log(q) + log_p)
    base = [0.0, 0.0] + [_renyi(j, log_p, log_q) for j in range(2, 33)]
    for a in (2, 3, 5, 8, 16, 32):
        bound = skellam.subsampled_rdp(a, q, base)
        removal, addition = _renyi(a, log_mix, log_q), _renyi(a, log_q, log_mix)
        assert removal == pytest.approx(bound, rel=1e-6)  # the expansion is exact for removal
        assert addition <= bound * (1 + 1e-6)


def test_skellam_epsilon_is_at_least_the_gaussians_and_close_to_it_when_noise_dominates():
    """The Skellam bound's leading term is the Gaussian's RDP; with the same orders and
    dp-accounting's own Gaussian accountant, epsilon can only be higher, and by little."""
    sens, z, rounds = 2000.0, 1.2, 30
    r = skellam.SkellamRound(sens, sens * 10, (z * sens) ** 2)
    gauss = rdp_lib.RdpAccountant(list(skellam.SKELLAM_ORDERS))
    gauss.compose(dp_event.GaussianDpEvent(z), rounds)
    g = gauss.get_epsilon(1e-5)
    s = skellam.epsilon([r] * rounds, 1e-5)
    assert g <= s <= 1.01 * g


def test_calibration_spends_at_most_the_target_and_not_much_less():
    mu = skellam.calibrate_variance(3.0, 1e-5, 40, 500.0, 5e4, 0.1)
    spent = skellam.epsilon([skellam.SkellamRound(500.0, 5e4, mu, 0.1)] * 40, 1e-5)
    assert 2.99 <= spent <= 3.0
    assert skellam.epsilon([skellam.SkellamRound(500.0, 5e4, 0.98 * mu, 0.1)] * 40, 1e-5) > 3.0


# -------------------------------------------------------------------------------- the encoding


@pytest.fixture(scope="module")
def plan():
    return distributed.make_plan(dim=3000, clip_norm=1.0, bits=20, target_epsilon=4.0, delta=1e-5, rounds=20,
                                 sample_rate=0.2, min_survivors=8, colluders=1, max_clients=20)


def test_the_rotation_is_orthogonal_and_inverted():
    u = np.random.default_rng(0).normal(size=1000)
    x = distributed.rotate(u, 11)
    assert x.size == 1024 and np.linalg.norm(x) == pytest.approx(np.linalg.norm(u))
    assert np.allclose(distributed.unrotate(x, 11, 1000), u)
    h = distributed.walsh_hadamard(np.eye(8)[3])
    assert np.allclose(np.abs(h), 1 / math.sqrt(8))


def test_the_decoded_sum_is_the_quantised_sum_plus_the_noise_exactly(plan):
    rng = np.random.default_rng(5)
    updates = [rng.normal(size=plan.dim) * s for s in (0.001, 0.02, 0.5, 3.0, 10.0)]  # the last two clipped
    quantised = [distributed.quantise(u, plan, 9, rng) for u in updates]
    noise = [distributed.noise_share(plan, rng) for _ in updates]
    assert all(np.linalg.norm(q) <= plan.l2 for q in quantised)
    total = np.mod(sum(np.mod(q + n, plan.modulus) for q, n in zip(quantised, noise)), plan.modulus)
    decoded = distributed.decode(total, plan, 9)
    exact = (sum(quantised) + sum(noise)).astype(np.float64)  # no wrap-around at these sizes
    assert np.array_equal(decoded, distributed.unrotate(exact / plan.scale, 9, plan.dim))
    clipped = sum(u * min(1.0, plan.clip_norm / np.linalg.norm(u)) for u in updates)
    err = decoded - clipped
    assert np.std(err) == pytest.approx(plan.noise_stddev(len(updates)), rel=0.1)


def test_the_largest_cohort_of_updates_pointing_the_same_way_does_not_wrap_around():
    """A round's updates are correlated: their sum's norm can be clients x C, not sqrt(clients) x C
    (the plan once assumed the latter, and such sums wrapped around the modulus). Little noise, so
    that the signal sets the scale."""
    plan = distributed.make_plan(dim=3000, clip_norm=1.0, bits=16, target_epsilon=1e4, delta=1e-5, rounds=20,
                                 sample_rate=0.2, min_survivors=8, colluders=0, max_clients=40)
    rng = np.random.default_rng(8)
    direction = rng.normal(size=plan.dim)
    quantised = [distributed.quantise(direction * 5.0, plan, 4, rng) for _ in range(plan.max_clients)]
    noise = [distributed.noise_share(plan, rng) for _ in quantised]
    total = np.mod(sum(np.mod(q + n, plan.modulus) for q, n in zip(quantised, noise)), plan.modulus)
    exact = (sum(quantised) + sum(noise)).astype(np.float64)
    assert np.abs(exact).max() < plan.modulus / 2  # no coordinate beyond the centred range
    assert np.array_equal(distributed.decode(total, plan, 4), distributed.unrotate(exact / plan.scale, 4, plan.dim))


def test_the_plan_states_its_guarantee_and_refuses_what_cannot_work(plan):
    assert plan.client_variance == pytest.approx(plan.variance / 7)  # t - c survivors carry mu
    assert plan.overflow_probability() <= 1e-6 and plan.quantisation_share() < 0.01
    assert skellam.epsilon(plan.rounds(20, 0.2), 1e-5) <= 4.0
    with pytest.raises(ValueError, match="bits"):
        distributed.make_plan(dim=3000, clip_norm=1.0, bits=6, target_epsilon=4.0, delta=1e-5, rounds=20,
                              sample_rate=0.2, min_survivors=8, colluders=1, max_clients=20)
    with pytest.raises(ValueError, match="colluding"):
        distributed.make_plan(dim=3000, clip_norm=1.0, bits=20, target_epsilon=4.0, delta=1e-5, rounds=20,
                              sample_rate=0.2, min_survivors=3, colluders=3, max_clients=20)


# ------------------------------------------------------------------------------------- SecAgg+


def run_round(params, vectors, drop_after_masking=(), drop_before_sharing=(), seed=1):
    clients = {u: SecAggClient(u, params) for u in vectors}
    server = SecAggServer(params, list(vectors), random.Random(seed))
    keys = server.keys_for({u: c.advertise() for u, c in clients.items()})
    shares = server.forward_shares({u: clients[u].share_keys(k) for u, k in keys.items()
                                    if u not in drop_before_sharing})
    masked = {u: clients[u].masked_input(s, vectors[u]) for u, s in shares.items() if u not in drop_after_masking}
    requests = server.unmask_requests(masked)
    revealed = {u: clients[u].unmask(*r) for u, r in requests.items()}
    total, survivors = server.aggregate(revealed)
    return total, survivors, masked


def vectors(n, dim, bits, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << bits, dim) for u in range(n)}


def test_the_server_decodes_exactly_the_sum_and_recovers_dropouts():
    params = SecAggParams(bits=16, dim=500, neighbours=6, threshold=3, min_survivors=5)
    xs = vectors(9, 500, 16)
    total, survivors, _ = run_round(params, xs, drop_after_masking={2, 6}, drop_before_sharing={8})
    assert survivors == [0, 1, 3, 4, 5, 7]
    assert np.array_equal(total, np.mod(sum(xs[u] for u in survivors), 1 << 16))
    # with 4 neighbours, client 2 keeps only 2 live holders of its key's shares: not recoverable
    small = SecAggParams(bits=16, dim=500, neighbours=4, threshold=3, min_survivors=5)
    with pytest.raises(SecAggError, match="2 shares of client 2's mask key, fewer than the 3"):
        run_round(small, xs, drop_after_masking={2, 6}, drop_before_sharing={8})


def test_what_the_server_sees_of_one_client_is_uniform_and_the_test_would_see_no_masking(monkeypatch):
    bits, dim = 12, 40_000
    params = SecAggParams(bits=bits, dim=dim, neighbours=4, threshold=2, min_survivors=3)
    small = {u: np.random.default_rng(u).integers(-3, 4, dim) for u in range(5)}  # an encoded update: near 0

    def p_value(y):
        counts = np.bincount(np.asarray(y) >> (bits - 6), minlength=64)  # 64 bins of the top 6 bits
        return stats.chisquare(counts).pvalue

    _, _, masked = run_round(params, small)
    assert min(p_value(y) for y in masked.values()) > 1e-6
    monkeypatch.setattr(secagg, "_MASKING", False)
    _, _, bare = run_round(params, small)
    assert max(p_value(y) for y in bare.values()) < 1e-6


def test_too_few_survivors_or_shares_drop_the_round_and_double_requests_are_refused():
    params = SecAggParams(bits=16, dim=50, neighbours=4, threshold=3, min_survivors=4)
    with pytest.raises(SecAggError, match="fewer than the 4"):
        run_round(params, vectors(5, 50, 16), drop_after_masking={0, 1})
    client = SecAggClient(0, params)
    client.advertise()
    with pytest.raises(SecAggError, match="both secrets"):
        client.unmask([1, 2], [2])
    server = SecAggServer(params, list(range(5)), random.Random(0))
    with pytest.raises(SecAggError, match="fewer than the 3"):
        server._combine([b"x"], 1, "mask key")


def test_a_client_state_survives_a_round_trip_between_stages():
    params = SecAggParams(bits=16, dim=100, neighbours=4, threshold=2, min_survivors=3)
    xs = vectors(4, 100, 16)
    clients = {u: SecAggClient(u, params) for u in xs}
    server = SecAggServer(params, list(xs), random.Random(2))
    keys = server.keys_for({u: c.advertise() for u, c in clients.items()})
    shares = server.forward_shares({u: clients[u].share_keys(k) for u, k in keys.items()})
    clients = {u: SecAggClient.from_state_dict(params, c.state_dict()) for u, c in clients.items()}  # another worker
    masked = {u: clients[u].masked_input(s, xs[u]) for u, s in shares.items()}
    requests = server.unmask_requests(masked)
    clients = {u: SecAggClient.from_state_dict(params, c.state_dict()) for u, c in clients.items()}
    total, _ = server.aggregate({u: clients[u].unmask(*r) for u, r in requests.items()})
    assert np.array_equal(total, np.mod(sum(xs.values()), 1 << 16))


@pytest.mark.parametrize("size", [32, 48, 16, 5])
def test_shamir_shares_are_flowers_format_both_ways_and_need_the_threshold(size):
    """fedpriv.secagg's thread-free Shamir helpers and Flower's combine each other's shares; fewer
    than the threshold reconstruct something else."""
    import os

    from flwr.common.secure_aggregation.crypto import shamir as flower

    secret = os.urandom(size)
    ours, theirs = secagg.create_shares(secret, 3, 5), flower.create_shares(secret, 3, 5)
    assert [len(s) for s in ours] == [len(s) for s in theirs] and [s[:4] for s in ours] == [s[:4] for s in theirs]
    assert flower.combine_shares([ours[4], ours[0], ours[2]]) == secret
    assert secagg.combine_shares([theirs[1], theirs[3], theirs[4]]) == secret
    assert secagg.combine_shares(ours[1:4]) == secret
    try:
        assert secagg.combine_shares(ours[:2]) != secret
    except ValueError:  # the padding of a wrong reconstruction is usually invalid
        pass


def test_masked_vectors_travel_as_b_bits_each_and_a_wrong_length_is_refused():
    rng = np.random.default_rng(4)
    for bits in (8, 20, 31, 62):
        values = rng.integers(0, 1 << bits, size=1000, dtype=np.int64)
        values[:2] = [0, (1 << bits) - 1]
        packed = secagg.pack(values, bits)
        assert packed.dtype == np.uint8 and packed.size == (1000 * bits + 7) // 8
        np.testing.assert_array_equal(secagg.unpack(packed, bits, 1000), values)
    with pytest.raises(ValueError, match="bytes"):
        secagg.unpack(secagg.pack(values[:999], 62), 62, 1000)
    with pytest.raises(ValueError, match="fit"):
        secagg.pack(np.array([1 << 20]), 20)
