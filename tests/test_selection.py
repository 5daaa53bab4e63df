"""Private selection (fedpriv.privacy.selection) against independent computations: the exponential
mechanism's closed-form probabilities (chi-square over many OpenDP draws, and the same test must
reject a wrong temperature), the worst-case privacy loss computed from those probabilities, and
dp-accounting's accountants on the event that dominates every epsilon-DP mechanism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event as de
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.privacy.selection import (
    epsilon_of_scale,
    gumbel_noisy_max,
    gumbel_scale,
    report_noisy_max,
    selection_probabilities,
)

SCORES = [0.0, 0.5, 1.0, 2.0, 3.0]
DRAWS = 20_000


def softmax_closed_form(scores, epsilon, sensitivity, c):
    """P(i) = exp(eps u_i / (c Delta)) / sum_j exp(eps u_j / (c Delta)), written out here."""
    w = [math.exp(epsilon * u / (c * sensitivity)) for u in scores]
    return np.array(w) / sum(w)


def draw_counts(scores, epsilon, sensitivity, monotone, draws=DRAWS):
    sample = gumbel_noisy_max(gumbel_scale(epsilon, sensitivity, monotone), monotone)
    return np.bincount([sample(list(scores)) for _ in range(draws)], minlength=len(scores))


@pytest.mark.parametrize("monotone,c", [(False, 2), (True, 1)])
def test_selection_frequencies_match_the_exponential_mechanism(monotone, c):
    counts = draw_counts(SCORES, 1.0, 1.0, monotone)
    expected = softmax_closed_form(SCORES, 1.0, 1.0, c) * DRAWS
    assert stats.chisquare(counts, expected).pvalue > 1e-5
    np.testing.assert_allclose(selection_probabilities(SCORES, 1.0, 1.0, monotone), expected / DRAWS, rtol=1e-12)


def test_the_chi_square_test_rejects_a_wrong_temperature():
    """The same draws (monotone, c=1) tested against c=2 (twice the temperature) must fail."""
    counts = draw_counts(SCORES, 1.0, 1.0, True)
    wrong = softmax_closed_form(SCORES, 1.0, 1.0, 2) * DRAWS
    assert stats.chisquare(counts, wrong).pvalue < 1e-9


def test_sensitivity_scales_the_noise():
    """Scores in units of Delta=0.25 select like the same scores divided by 0.25 at Delta=1."""
    quarter = [u * 0.25 for u in SCORES]
    counts = draw_counts(quarter, 1.0, 0.25, False)
    expected = softmax_closed_form(SCORES, 1.0, 1.0, 2) * DRAWS
    assert stats.chisquare(counts, expected).pvalue > 1e-5


def worst_log_ratio(u, u_prime, scale):
    """max over outcomes of |log P(i|u) - log P(i|u')| for the softmax with temperature ``scale``."""
    lp = np.asarray(u) / scale - np.logaddexp.reduce(np.asarray(u) / scale)
    lq = np.asarray(u_prime) / scale - np.logaddexp.reduce(np.asarray(u_prime) / scale)
    return float(np.max(np.abs(lp - lq)))


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0])
def test_privacy_loss_of_the_closed_form_stays_within_epsilon_and_reaches_it(epsilon):
    """Neighbouring score vectors (|u - u'|_inf <= Delta): the loss never passes epsilon; the
    classic worst cases (one score up and the others down; monotone: one score up among many
    equal ones) come within 1% of it, so the factor c is not loose either."""
    delta_u, k = 1.0, 2000
    rng = np.random.default_rng(0)
    for monotone in (False, True):
        scale = gumbel_scale(epsilon, delta_u, monotone)
        for _ in range(200):
            u = rng.normal(0, 3, size=6)
            shift = rng.uniform(0, delta_u, size=6) if monotone else rng.uniform(-delta_u, delta_u, size=6)
            assert worst_log_ratio(u, u + shift, scale) <= epsilon + 1e-12
    general = gumbel_scale(epsilon, delta_u, False)
    up_down = np.r_[delta_u, -delta_u * np.ones(k - 1)]
    assert worst_log_ratio(np.zeros(k), up_down, general) >= 0.99 * epsilon
    mono = gumbel_scale(epsilon, delta_u, True)
    one_up = np.r_[delta_u, np.zeros(k - 1)]
    assert worst_log_ratio(np.zeros(k), one_up, mono) >= 0.99 * epsilon


@pytest.mark.parametrize("epsilon,monotone", [(0.5, False), (2.0, True)])
def test_accounted_epsilon_matches_dp_accounting(epsilon, monotone):
    """The selection's epsilon, charged as the epsilon-DP event that dominates every epsilon-DP
    mechanism (binary randomized response), comes back from dp-accounting's PLD at delta = 0;
    its zCDP figure from OpenDP's map is Cesar & Rogers's epsilon^2 / 8 and gives dp-accounting's
    RDP the same epsilon at delta as a zCDP event built here from the closed form."""
    sel = report_noisy_max(SCORES, epsilon, 1.0, monotone=monotone)
    assert sel.epsilon == pytest.approx(epsilon, rel=1e-12)
    rr = de.RandomizedResponseDpEvent(noise_parameter=2.0 / (1.0 + math.exp(sel.epsilon)), num_buckets=2)
    # dp-accounting accepts randomized response only under replace-one; an epsilon-DP guarantee is
    # the same statement under either relation (the pair (RR(u), RR(u')) is symmetric).
    pld = pld_privacy_accountant.PLDAccountant(NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4)
    pld.compose(rr)
    assert pld.get_epsilon(0.0) == pytest.approx(epsilon, rel=1e-3)
    # what the run's ledger reports for the selection is what dp-accounting gives for that event
    ledger = PrivacyLedger()
    ledger.record_pure_dp(sel.epsilon, label="model selection", mechanism="exponential")
    assert ledger.epsilon(0.0) == pytest.approx(epsilon, rel=1e-9)
    assert ledger.epsilon(1e-5, "pld") == pytest.approx(pld.get_epsilon(1e-5), rel=1e-2)
    assert sel.rho == pytest.approx(epsilon ** 2 / 8, rel=1e-12)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(de.ZCDpEvent(sel.rho))
    closed = epsilon ** 2 / 8 + 2 * math.sqrt(epsilon ** 2 / 8 * math.log(1e5))  # Bun & Steinke, Prop. 1.3
    assert rdp.get_epsilon(1e-5) <= closed + 1e-9


def test_epsilon_of_scale_inverts_gumbel_scale():
    for monotone in (False, True):
        scale = gumbel_scale(0.7, 0.3, monotone)
        assert epsilon_of_scale(scale, 0.3, monotone)[0] == pytest.approx(0.7, rel=1e-12)


@pytest.mark.parametrize("bad", [dict(epsilon=0.0), dict(epsilon=math.inf), dict(sensitivity=0.0),
                                 dict(scores=[]), dict(scores=[1.0, math.nan])])
def test_bad_arguments_are_refused(bad):
    args = dict(scores=SCORES, epsilon=1.0, sensitivity=1.0) | bad
    with pytest.raises(ValueError):
        report_noisy_max(args["scores"], args["epsilon"], args["sensitivity"], monotone=False)


# ================================================================== in a run (fedpriv.selection)

QUIET = ["tracking.progress=false"]
RUN = ["num_clients=12", "clients_per_round=4", "num_rounds=3", "analytics=central",
       "analytics.epsilon_label_histogram=null", *QUIET]
CENTRAL = ["privacy=central", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "privacy.delta=1e-5"]


@pytest.mark.parametrize("overrides,key", [
    (["selection=noisy_max"], "selection.method"),  # no analytics: nothing to choose by
    (["privacy=local", "analytics=local", "selection=noisy_max"], "selection.method"),  # no raw sums on the server
    (["analytics=central", "analytics.epsilon_validation=null", "selection=released_argmax"], "selection.method"),
    (["analytics=central", "selection=noisy_max", "selection.epsilon=null"], "selection.epsilon"),
    (["analytics=central", "selection=noisy_max", "selection.epsilon=0"], "selection.epsilon"),
    (["analytics=central", "analytics.validation_every=5", "num_rounds=3", "selection=released_argmax"],
     "selection.method"),
    (["analytics=central", "selection.epsilon=1.0"], "selection.epsilon"),  # read only by noisy_max
])
def test_unsound_selections_are_refused_in_one_line(overrides, key):
    from fedpriv.compose import compose_config
    from fedpriv.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        compose_config(overrides)
    assert "\n" not in str(err.value)


def independent_total_epsilon(events: list[dict], delta: float) -> float:
    """privacy.json's total, rebuilt from dp-accounting's mechanism PLDs, one per listed event; a
    pure release as the randomized-response pair with its epsilon (Kairouz et al. 2015)."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    pld = None
    for e in events:
        if e.get("kind") == "laplace":
            term = pld_lib.from_laplace_mechanism(e["scale"], sensitivity=e["sensitivity"],
                                                  value_discretization_interval=1e-3)
        elif e.get("kind") == "pure":
            term = pld_lib.from_randomized_response(2 / (1 + math.exp(e["pure_epsilon"])), 2,
                                                    value_discretization_interval=1e-3)
        else:
            term = pld_lib.from_gaussian_mechanism(e["noise_multiplier"], sampling_prob=e["sampling_rate"],
                                                   value_discretization_interval=1e-3)
        term = term.self_compose(e["count"])
        pld = term if pld is None else pld.compose(term)
    return float(pld.get_epsilon_for_delta(delta))


def load_weights(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_noisy_max_ships_a_validated_model_and_the_total_includes_its_cost(tmp_path, flower_run_identity):
    import json

    import torch
    from conftest import InProcessGrid

    from fedpriv import run_folder
    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation
    from fedpriv.selection import DECISION, candidate_path

    rc = compose_config([*RUN, *CENTRAL, "selection=noisy_max", "selection.epsilon=2.0", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    section = report["selection"]
    assert section["method"] == "noisy_max" and section["epsilon"] == 2.0 and section["monotone"] is True
    assert section["candidates_model_after_round"] == [0, 1, 2]
    shipped = section["selected_model_after_round"]
    assert shipped in (0, 1, 2) and summary["shipped_model_after_round"] == shipped
    # model.pt is the chosen round's model, byte for byte
    model = load_weights(tmp_path / run_folder.MODEL)
    kept = load_weights(candidate_path(tmp_path, shipped))
    assert all(torch.equal(model[k], kept[k]) for k in kept)
    # the cost: one pure release in the analytics ledger, inside the run's total
    rows = [r for r in report["analytics"]["releases"] if r["label"] == "model selection"]
    assert len(rows) == 1 and rows[0]["count"] == 1 and rows[0]["epsilon"] == pytest.approx(2.0)
    assert report["epsilon"] == pytest.approx(independent_total_epsilon(report["events"], 1e-5), rel=1e-3)
    without = [e for e in report["events"] if e.get("kind") != "pure"]
    assert report["epsilon"] > independent_total_epsilon(without, 1e-5) + 0.05
    # the raw scores are operator-only: -(n - S) per validated round, from the server's raw sums
    decision = json.loads((tmp_path / DECISION).read_text())
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["analytics"]["raw"]
    assert decision["raw_scores"] == pytest.approx([s - n for _, s, n in raw])
    published = (tmp_path / "metrics.jsonl").read_text() + (tmp_path / "summary.json").read_text()
    assert "raw_scores" not in published and "raw_scores" not in json.dumps(report)


class CrashAtEnd:
    """Stops the run after everything else ended (decision, privacy.json, model.pt written)."""

    def on_start(self, state):
        pass

    def after_round(self, state, result):
        return False

    def on_end(self, state, summary):
        raise RuntimeError("simulated crash at the end")


class CrashAfterRound1(CrashAtEnd):
    def after_round(self, state, result):
        if result.server_round == 1:
            raise RuntimeError("simulated crash")
        return False

    def on_end(self, state, summary):
        pass


def test_resume_keeps_candidates_and_never_draws_twice(tmp_path, flower_run_identity, monkeypatch):
    import json

    from conftest import InProcessGrid

    import fedpriv.selection as selection
    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation

    base = [*RUN, *CENTRAL, "privacy.secure_rng=false", "selection=noisy_max", f"run_dir={tmp_path}"]
    with pytest.raises(RuntimeError):
        run_federation(InProcessGrid(2), compose_config(base), [CrashAfterRound1()])
    with pytest.raises(RuntimeError):
        run_federation(InProcessGrid(2), compose_config([*base, "resume=true"]), [CrashAtEnd()])
    first = json.loads((tmp_path / selection.DECISION).read_text())
    assert first["validated_rounds"] == [1, 2, 3]  # the candidate kept before the crash is still there

    def no_second_draw(*args, **kwargs):
        raise AssertionError("a resumed run drew the selection again")

    monkeypatch.setattr(selection, "report_noisy_max", no_second_draw)
    run_federation(InProcessGrid(2), compose_config([*base, "resume=true"]))
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["selection"]["selected_model_after_round"] == first["winner_round"] - 1
    assert [r["count"] for r in report["analytics"]["releases"] if r["label"] == "model selection"] == [1]


def test_released_argmax_is_free_post_processing(tmp_path, flower_run_identity):
    import json

    from conftest import InProcessGrid

    from fedpriv import run_folder
    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation

    rc = compose_config([*RUN, *CENTRAL, "selection=released_argmax", f"run_dir={tmp_path}"])
    run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    released = {m["round"]: m["analytics_val_accuracy"] for m in run_folder.read_metrics(tmp_path)}
    best = max(sorted(released), key=released.get)  # the published figures, ties to the earliest
    assert report["selection"]["selected_model_after_round"] == best - 1
    assert report["selection"]["epsilon"] == 0.0
    assert not [r for r in report["analytics"]["releases"] if r["label"] == "model selection"]
    assert report["epsilon"] == pytest.approx(independent_total_epsilon(report["events"], 1e-5), rel=1e-3)


def test_a_single_candidate_is_shipped_without_a_charge(tmp_path, flower_run_identity):
    """validation_every=3 of 3 rounds: one candidate (the model after round 2); its choice is constant."""
    import json

    from conftest import InProcessGrid

    from fedpriv.compose import compose_config
    from fedpriv.federation import run_federation

    rc = compose_config([*RUN, *CENTRAL, "analytics.validation_every=3", "selection=noisy_max", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["selection"]["candidates_model_after_round"] == [2] and summary["shipped_model_after_round"] == 2
    assert report["selection"]["epsilon"] == 0.0
    assert not [r for r in report["analytics"]["releases"] if r["label"] == "model selection"]
