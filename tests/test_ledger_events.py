"""Pure-DP events in the privacy ledger (Laplace, any epsilon-DP mechanism), checked against
independent computations: closed forms (Laplace's hockey-stick curve, Kairouz-Oh-Viswanath's optimal
composition), and a direct numerical integration of a Gaussian x Laplace privacy loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import comb
from scipy.stats import norm

from fedpriv.privacy.ledger import PrivacyLedger


def laplace_delta(eps: float, eps0: float) -> float:
    """Exact hockey-stick divergence of the Laplace pair with epsilon eps0 = s/b at eps."""
    return max(0.0, 1.0 - math.exp((eps - eps0) / 2.0))


def kov_delta(k: int, eps: float, i: int) -> float:
    """Kairouz, Oh & Viswanath (2015) Thm 3.3: k-fold composition of (eps, 0)-DP is
    ((k - 2i) eps, delta_i)-DP, and this is optimal."""
    return sum(comb(k, l, exact=True) * (math.exp((k - l) * eps) - math.exp((k - 2 * i + l) * eps))
               for l in range(i)) / (1 + math.exp(eps)) ** k


def gaussian_laplace_delta(eps: float, sigma: float, b: float) -> float:
    """delta(eps) of Gaussian (sensitivity 1, std sigma) composed with Laplace (sensitivity 1,
    scale b), integrated numerically over the Laplace privacy loss; the Gaussian part in closed form."""
    mu = 1.0 / (2 * sigma**2)

    def gauss_part(c: float) -> float:  # E[(1 - e^(c - Z))_+], Z ~ N(mu, 2 mu)
        s = math.sqrt(2 * mu)
        return norm.cdf((mu - c) / s) - math.exp(c) * norm.cdf((-mu - c) / s)

    # Under P = Lap(1, b): loss (|x| - |x-1|)/b: -1/b for x <= 0, (2x-1)/b on (0,1), 1/b for x >= 1.
    p_left = 0.5 * math.exp(-1.0 / b)
    p_right = 0.5
    middle, _ = integrate.quad(lambda x: math.exp(-abs(x - 1) / b) / (2 * b) * gauss_part(eps - (2 * x - 1) / b),
                               0.0, 1.0, epsabs=1e-13)
    return p_left * gauss_part(eps + 1.0 / b) + p_right * gauss_part(eps - 1.0 / b) + middle


@pytest.mark.parametrize("s,b", [(1.0, 2.0), (2.0, 1.0), (1.0, 0.25)])
def test_laplace_epsilon_is_s_over_b(s, b):
    led = PrivacyLedger()
    led.record_laplace(b / s, label="counts", sensitivity=s, scale=b)
    assert led.epsilon(0.0) == pytest.approx(s / b, rel=1e-12)
    assert led.epsilon(1e-12) == pytest.approx(s / b, rel=2e-3)  # PLD, pessimistic
    for eps in (0.1 * s / b, 0.5 * s / b, 0.9 * s / b):  # the whole curve, against its closed form
        assert led.delta_for_epsilon(eps) >= laplace_delta(eps, s / b) - 1e-12
        assert led.delta_for_epsilon(eps) == pytest.approx(laplace_delta(eps, s / b), rel=2e-2, abs=1e-6)
    row = led.releases_table()[0]
    assert (row["label"], row["mechanism"], row["sensitivity"], row["scale"]) == ("counts", "laplace", s, b)
    assert row["epsilon"] == pytest.approx(s / b)


def test_laplace_composed_with_gaussian_matches_numerical_integration():
    sigma, b = 2.0, 1.5
    led = PrivacyLedger()
    led.record(sigma, 1.0, "all")
    led.record_laplace(b, label="validation")
    assert led.epsilon(0.0) == math.inf
    for eps in (0.3, 0.8, 1.2):
        truth = gaussian_laplace_delta(eps, sigma, b)
        assert led.delta_for_epsilon(eps, "pld") >= truth - 1e-12  # an upper bound...
        assert led.delta_for_epsilon(eps, "pld") == pytest.approx(truth, rel=2e-2)  # ...and a tight one
        assert led.delta_for_epsilon(eps, "rdp") >= truth - 1e-12
    # the epsilon at delta inverts the integrated curve
    eps_led = led.epsilon(1e-5)
    assert gaussian_laplace_delta(eps_led, sigma, b) <= 1e-5 * (1 + 1e-6)
    assert gaussian_laplace_delta(eps_led - 0.02, sigma, b) > 1e-5


def test_pure_dp_single_event_gives_epsilon_back():
    led = PrivacyLedger()
    led.record_pure_dp(0.7, label="best round", mechanism="exponential")
    assert led.epsilon(0.0) == pytest.approx(0.7)
    assert led.epsilon(1e-12) == pytest.approx(0.7, rel=2e-3)
    assert led.delta_for_epsilon(0.7 + 1e-3) == pytest.approx(0.0, abs=1e-9)
    assert led.epsilon(1e-12, "rdp") >= 0.7 * (1 - 1e-3)  # RDP is an upper bound too


@pytest.mark.parametrize("k,eps", [(10, 0.3), (25, 0.1), (6, 1.0)])
def test_pure_dp_composition_matches_kairouz_oh_viswanath(k, eps):
    led = PrivacyLedger()
    led.record_pure_dp(eps, k, label="selections", mechanism="exponential")
    assert led.epsilon(0.0) == pytest.approx(k * eps)
    for i in range(1, k // 2 + 1):
        eps_g, want = (k - 2 * i) * eps, kov_delta(k, eps, i)
        assert led.delta_for_epsilon(eps_g, "pld") >= want - 1e-12  # a valid bound at every point
        assert led.delta_for_epsilon(eps_g, "rdp") >= want - 1e-12
        # and a tight one: the PLD rounds each of the k losses up by at most its grid (1e-3)
        assert eps_g - 1e-9 <= led.epsilon(want, "pld") <= eps_g + k * 1e-3 + 1e-6


def test_state_dict_keeps_labels_and_mechanisms():
    led = PrivacyLedger()
    led.record_laplace(2.0, label="label histogram", sensitivity=1.0, scale=2.0)
    led.record(1.1, 0.1, "poisson", count=3)
    led.record_laplace(4.0, label="validation", sensitivity=2.0, scale=8.0)
    led.record_laplace(4.0, label="validation", sensitivity=2.0, scale=8.0)  # merges with the previous one
    led.record_laplace(4.0, label="other", sensitivity=2.0, scale=8.0)  # a new label does not merge
    led.record_pure_dp(0.5, label="selection", mechanism="exponential")
    back = PrivacyLedger.from_state_dict(led.state_dict())
    assert back.events == led.events
    assert back.epsilon(1e-5) == led.epsilon(1e-5)
    assert [r["label"] for r in back.releases_table()] == ["label histogram", "validation", "other", "selection"]
    assert [r["count"] for r in back.releases_table()] == [1, 2, 1, 1]
    # an old state (Gaussian events with six keys) still loads
    old = {"version": 1, "value_discretization_interval": 1e-3, "events": [
        {"noise_multiplier": 1.0, "sampling_rate": 0.5, "sampling": "poisson", "count": 2,
         "population": None, "sample_size": None}]}
    assert PrivacyLedger.from_state_dict(old).num_releases == 2


def test_pure_events_double_under_replace_one():
    led = PrivacyLedger()
    led.record(2.0, 0.1, "fixed", population=100, sample_size=10)
    led.record_laplace(2.0, label="h")
    led.record_pure_dp(0.3, label="sel", mechanism="exponential")
    assert [r["epsilon"] for r in led.releases_table()] == [pytest.approx(1.0), pytest.approx(0.6)]
    gauss_only = PrivacyLedger()
    gauss_only.record(2.0, 0.1, "fixed", population=100, sample_size=10)
    assert led.epsilon(1e-5) > gauss_only.epsilon(1e-5) + 0.5


def test_bad_pure_events_are_refused():
    led = PrivacyLedger()
    for bad in (math.inf, -1.0, math.nan):
        with pytest.raises(ValueError):
            led.record_laplace(bad, label="x")
    for bad in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError):
            led.record_pure_dp(bad, label="x", mechanism="exponential")
    with pytest.raises(ValueError):
        led.record_laplace(2.0, label="x", sensitivity=1.0, scale=3.0)  # ratio disagrees
    led.record_laplace(0.0, label="noiseless")
    assert led.epsilon(1e-5) == math.inf and led.epsilon(0.0) == math.inf
    with pytest.raises(ValueError):
        PrivacyLedger().epsilon(1.0)
    assert np.isfinite(PrivacyLedger().epsilon(0.0))
