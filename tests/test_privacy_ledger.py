"""PrivacyLedger, budget helpers and adaptive-clipping noise against independent
computations: dp-accounting called directly on hand-built DpEvents, Opacus's
RDP analysis, and closed forms. The ledger is never compared with itself
except where the point is that two ways of filling it must agree."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest
from dp_accounting import dp_event as de
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from fedpriv.privacy import (
    RDP_ORDERS,
    BudgetExceeded,
    DpRelease,
    PrivacyLedger,
    check_delta,
    default_delta,
    ensure_within_budget,
    total_noise_multiplier,
    update_noise_for_total,
    would_exceed,
)

DELTA = 1e-5


def direct_pld(event: de.DpEvent, vdi: float = 1e-3) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=vdi)
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def direct_rdp(event: de.DpEvent, orders=None,
               relation=NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
    acc = rdp_privacy_accountant.RdpAccountant(orders=orders, neighboring_relation=relation)
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def poisson(q: float, z: float, n: int) -> de.DpEvent:
    return de.SelfComposedDpEvent(de.PoissonSampledDpEvent(q, de.GaussianDpEvent(z)), n)


def filled(n: int, **release) -> PrivacyLedger:
    ledger = PrivacyLedger()
    for _ in range(n):
        ledger.record(**release)
    return ledger


# --------------------------------------------------------------------------- reference cases


def test_poisson_120_of_3383_z12_100_rounds():
    q = 120 / 3383
    ledger = filled(100, noise_multiplier=1.2, sampling_rate=q, sampling="poisson")
    report = ledger.epsilon_report(DELTA)
    assert report["accountant"] == "pld" and report["epsilon"] == report["pld"]
    assert report["pld"] == pytest.approx(direct_pld(poisson(q, 1.2, 100)), rel=1e-6)
    assert report["rdp"] == pytest.approx(direct_rdp(poisson(q, 1.2, 100), RDP_ORDERS), rel=1e-9)
    default_grid = direct_rdp(poisson(q, 1.2, 100))
    assert report["rdp"] <= default_grid * (1 + 1e-12)  # our grid contains the default
    assert report["rdp"] == pytest.approx(default_grid, rel=3e-3)
    assert report["pld"] == pytest.approx(1.71, abs=0.01)
    assert report["rdp"] == pytest.approx(1.99, abs=0.01)


def test_poisson_q01_z1_200_rounds():
    ledger = filled(200, noise_multiplier=1.0, sampling_rate=0.1, sampling="poisson")
    assert len(ledger.events) == 1 and ledger.events[0].count == 200
    pld, rdp = ledger.epsilon(DELTA, "pld"), ledger.epsilon(DELTA, "rdp")
    assert pld == pytest.approx(direct_pld(poisson(0.1, 1.0, 200)), rel=1e-6)
    assert rdp == pytest.approx(direct_rdp(poisson(0.1, 1.0, 200)), rel=1e-3)
    assert pld == pytest.approx(9.97, abs=0.01)
    assert rdp == pytest.approx(11.07, abs=0.02)
    assert ledger.epsilon(DELTA) == pld  # reported figure


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP Gaussian (Balle & Wang 2018), by root finding."""
    def excess(eps):
        return (stats.norm.cdf(-eps / mu + mu / 2)
                - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)
    return optimize.brentq(excess, 0.0, mu * mu + 20 * mu)


def test_all_sampling_has_no_amplification():
    # A coarser PLD grid keeps this fast; the bound is checked against the exact value.
    ledger = PrivacyLedger(value_discretization_interval=1e-2)
    ledger.record(1.0, 1.0, "all", count=200)
    exact = gaussian_epsilon(math.sqrt(200) / 1.0, DELTA)
    pld = ledger.epsilon(DELTA, "pld")
    assert exact <= pld <= exact * 1.001  # pessimistic PLD: a tight upper bound
    rdp = ledger.epsilon(DELTA, "rdp")
    assert rdp == pytest.approx(direct_rdp(de.SelfComposedDpEvent(de.GaussianDpEvent(1.0), 200)),
                                rel=1e-9)
    assert rdp == pytest.approx(166.0, abs=0.5)
    assert pld == pytest.approx(159.4, abs=0.2)


def test_fixed_size_sampling_is_rdp_under_replace_one_with_halved_noise():
    ledger = filled(200, noise_multiplier=1.0, sampling_rate=0.1, sampling="fixed",
                    population=1000, sample_size=100)
    assert ledger.reported_accountant() == "rdp"
    assert ledger.neighboring_relation == "replace_one"
    assert ledger.caveats
    with pytest.raises(ValueError, match="PLD"):
        ledger.epsilon(DELTA, "pld")
    report = ledger.epsilon_report(DELTA)
    assert report["pld"] is None and report["accountant"] == "rdp"

    def wor(z):
        return de.SelfComposedDpEvent(
            de.SampledWithoutReplacementDpEvent(1000, 100, de.GaussianDpEvent(z)), 200)

    # Replacing a unit moves a sum of clipped vectors by 2C: noise z*C is z/2
    # in units of the replace-one sensitivity.
    honest = direct_rdp(wor(0.5), relation=NeighboringRelation.REPLACE_ONE)
    assert report["rdp"] <= honest * (1 + 1e-12)
    assert report["rdp"] == pytest.approx(honest, rel=3e-3)
    assert report["rdp"] == pytest.approx(157.7, abs=0.5)
    # The ~20.7 quoted for Flower is dp-accounting fed z=1 as if the
    # replace-one sensitivity were C.
    naive = direct_rdp(wor(1.0), relation=NeighboringRelation.REPLACE_ONE)
    assert naive == pytest.approx(20.7, abs=0.05)


def load_opacus_rdp_analysis():
    """Opacus's RDP analysis module, loaded without importing torch."""
    spec = importlib.util.find_spec("opacus")
    if spec is None:
        pytest.skip("opacus not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "accountants/analysis/rdp.py"
    module_spec = importlib.util.spec_from_file_location("_opacus_rdp_analysis", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_local_dp_sgd_composes_across_rounds():
    """Batch 64 of 512 (q=0.125), z=1, 8 steps a round: the per-client epsilon
    must grow with rounds (3.79, 4.70, 5.41), not restart each round."""
    opacus = load_opacus_rdp_analysis()
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus defaults
    opacus_step = opacus.compute_rdp(q=0.125, noise_multiplier=1.0, steps=1, orders=alphas)
    dpa = rdp_privacy_accountant.RdpAccountant()  # dp-accounting, default orders
    dpa.compose(de.PoissonSampledDpEvent(0.125, de.GaussianDpEvent(1.0)))
    ledger = PrivacyLedger()
    for rounds, expected in zip((1, 2, 3), (3.79, 4.70, 5.41)):
        ledger.record(1.0, 0.125, "poisson", count=8)
        rdp = ledger.epsilon(DELTA, "rdp")
        steps = 8 * rounds
        opacus_eps, _ = opacus.get_privacy_spent(orders=alphas, rdp=opacus_step * steps,
                                                 delta=DELTA)
        dpa_eps, _ = rdp_privacy_accountant.compute_epsilon(dpa.orders, dpa.rdp * steps, DELTA)
        assert rdp == pytest.approx(opacus_eps, rel=5e-3)
        assert rdp == pytest.approx(dpa_eps, rel=1e-3)
        assert rdp == pytest.approx(expected, abs=0.01)
    assert ledger.events == [DpRelease(1.0, 0.125, "poisson", 24)]
    assert ledger.epsilon(DELTA) == pytest.approx(direct_pld(poisson(0.125, 1.0, 24)), rel=1e-6)
    assert ledger.epsilon(DELTA) < rdp  # PLD is tighter


# --------------------------------------------------------------------------- ledger mechanics


def test_merging_and_state_dict_round_trip_keep_epsilon_identical():
    one_by_one = PrivacyLedger()
    for _ in range(30):
        one_by_one.record(1.2, 0.05, "poisson")
    for _ in range(20):
        one_by_one.record(1.0, 0.05, "poisson", count=2)
    at_once = PrivacyLedger()
    at_once.record(1.2, 0.05, "poisson", count=30)
    at_once.record(1.0, 0.05, "poisson", count=40)
    assert one_by_one.events == at_once.events
    assert [e.count for e in one_by_one.events] == [30, 40]

    restored = PrivacyLedger.from_state_dict(json.loads(json.dumps(one_by_one.state_dict())))
    assert restored.events == one_by_one.events
    for acc in ("pld", "rdp"):
        assert restored.epsilon(DELTA, acc) == one_by_one.epsilon(DELTA, acc) \
            == at_once.epsilon(DELTA, acc)
    # ...and the figure is the composition of both parts.
    both = de.ComposedDpEvent([poisson(0.05, 1.2, 30), poisson(0.05, 1.0, 40)])
    assert restored.epsilon(DELTA, "pld") == pytest.approx(direct_pld(both), rel=1e-6)


def test_non_adjacent_identical_releases_do_not_merge():
    ledger = PrivacyLedger()
    for z in (1.0, 2.0, 1.0):
        ledger.record(z, 0.1, "poisson")
    assert [e.noise_multiplier for e in ledger.events] == [1.0, 2.0, 1.0]
    assert ledger.num_releases == 3


def test_noiseless_release_means_infinite_epsilon():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.1, "poisson", count=5)
    ledger.record(0.0, 0.1, "poisson")
    assert ledger.epsilon(DELTA, "pld") == math.inf
    assert ledger.epsilon(DELTA, "rdp") == math.inf
    assert ledger.delta_for_epsilon(100.0) == 1.0
    assert any("infinite" in c for c in ledger.caveats)
    json.dumps(ledger.state_dict())


def test_empty_and_unsampled_ledgers_cost_nothing():
    ledger = PrivacyLedger()
    assert ledger.epsilon(DELTA) == 0.0
    ledger.record(1.0, 0.0, "poisson", count=10)
    assert ledger.epsilon(DELTA, "pld") == 0.0 and ledger.epsilon(DELTA, "rdp") == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=math.inf, sampling_rate=0.1, sampling="poisson"), "inf"),
    (dict(noise_multiplier=-1.0, sampling_rate=0.1, sampling="poisson"), ">= 0"),
    (dict(noise_multiplier=1.0, sampling_rate=1.5, sampling="poisson"), r"\[0, 1\]"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, sampling="shuffle"), "sampling"),
    (dict(noise_multiplier=1.0, sampling_rate=0.5, sampling="all"), "1.0"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, sampling="fixed"), "population"),
    (dict(noise_multiplier=1.0, sampling_rate=0.2, sampling="fixed", population=1000,
          sample_size=100), "sample_size/population"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, sampling="poisson", count=0), "count"),
])
def test_invalid_releases_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyLedger().record(**kwargs)


def test_poisson_and_fixed_cannot_share_a_ledger():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.1, "poisson")
    with pytest.raises(ValueError, match="compose"):
        ledger.record(1.0, 0.1, "fixed", population=10, sample_size=1)
    assert len(ledger.events) == 1


def test_delta_for_epsilon_inverts_epsilon():
    ledger = filled(50, noise_multiplier=1.0, sampling_rate=0.05, sampling="poisson")
    for acc in ("pld", "rdp"):  # same release as above: cached curves
        eps = ledger.epsilon(DELTA, acc)
        assert ledger.delta_for_epsilon(eps, acc) == pytest.approx(DELTA, rel=0.02)
        assert ledger.delta_for_epsilon(eps * 1.1, acc) < DELTA


# --------------------------------------------------------------------------- budget


def test_default_and_checked_delta():
    assert default_delta(1000) == 1e-5
    assert default_delta(10**6) == pytest.approx(10 ** -6.6)
    check_delta(1e-5, 1000)
    with pytest.raises(ValueError, match="1/population"):
        check_delta(1e-3, 1000)
    with pytest.raises(ValueError):
        default_delta(0)


def test_would_exceed_simulates_on_a_copy():
    ledger = filled(10, noise_multiplier=1.0, sampling_rate=0.05, sampling="poisson")
    before = ledger.state_dict()
    nxt = dict(noise_multiplier=1.0, sampling_rate=0.05, sampling="poisson")
    after_next = direct_pld(poisson(0.05, 1.0, 11))
    assert would_exceed(ledger, nxt, after_next * 0.999, DELTA)
    assert not would_exceed(ledger, nxt, after_next * 1.001, DELTA)
    assert ledger.state_dict() == before
    with pytest.raises(BudgetExceeded) as info:
        ensure_within_budget(ledger, nxt, after_next * 0.999, DELTA)
    assert info.value.epsilon == pytest.approx(after_next, rel=1e-6)
    ensure_within_budget(ledger, nxt, after_next * 1.001, DELTA)


# --------------------------------------------------------------------------- adaptive clipping


def test_adaptive_clipping_noise_by_hand():
    # Andrew et al.: m = 100 expected clients, sigma_b = m / 20 = 5.
    # 1/z_total^2 = 1/z_update^2 + 1/(2*5)^2.
    z_update = update_noise_for_total(1.0, 5.0)
    assert z_update == pytest.approx(1 / math.sqrt(1 - 1 / 100))  # 1.0050378...
    assert z_update == pytest.approx(1.0050378152592121, rel=1e-12)
    assert total_noise_multiplier(z_update, 5.0) == pytest.approx(1.0, rel=1e-12)
    assert total_noise_multiplier(1.0, math.inf) == 1.0
    with pytest.raises(ValueError, match="sigma_b"):
        update_noise_for_total(1.0, 0.5)


def test_adaptive_clipping_noise_matches_composing_the_two_gaussians():
    """The update (sensitivity C, noise z*C) and the centred count (sensitivity
    1/2, noise sigma_b, i.e. noise multiplier 2*sigma_b) composed by
    dp-accounting must cost exactly a single Gaussian with z_total."""
    z_total, sigma_b = 0.8, 1.5
    z_update = update_noise_for_total(z_total, sigma_b)
    pair = de.ComposedDpEvent([de.GaussianDpEvent(z_update), de.GaussianDpEvent(2 * sigma_b)])
    single = de.GaussianDpEvent(z_total)
    assert direct_rdp(de.SelfComposedDpEvent(pair, 10)) == pytest.approx(
        direct_rdp(de.SelfComposedDpEvent(single, 10)), rel=1e-9)
