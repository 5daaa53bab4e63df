"""Planted secrets and their exposure (Carlini et al. 2019): the rows a holder trains on, the rank
estimate, the ceiling a guarantee allows, and a federated run that reports them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import shared_data_dir
from fedpriv.audit import exposure
from fedpriv.compose import compose_config
from fedpriv.data.text import character_tokenizer, load_tokenizer
from fedpriv.errors import ConfigError

DATA = shared_data_dir()
needs_sent140 = pytest.mark.skipif(
    DATA is None or not (DATA / "sent140").is_dir(),
    reason="Sentiment140 not found: set FEDPRIV_DATA to a folder with sent140/ (CI uses ../shared/data)")


# ------------------------------------------------------------------ the estimate and the ceiling (no data)


def test_rank_exposure_counts_candidates_at_or_below_the_secret():
    candidates = np.array([3.0, 0.5, 1.0, 2.0])
    # 0.5 and 1.0 are at or below 1.0 (a tie counts against the secret): p = (1 + 2) / 5
    assert exposure.rank_exposure(np.array([1.0]), candidates)[0] == pytest.approx(-math.log2(3 / 5))
    assert exposure.rank_exposure(np.array([0.1]), candidates)[0] == pytest.approx(math.log2(5))  # ranked first
    assert exposure.rank_exposure(np.array([9.0]), candidates)[0] == pytest.approx(0.0)  # ranked last


def test_the_estimate_approaches_the_exact_exposure_of_a_small_space():
    """With candidates drawn from the whole of a space small enough to enumerate, the sampled rank
    gives the exposure of Carlini et al.'s Definition 4 (log2 |R| - log2 rank over all of R)."""
    rng = np.random.default_rng(1)
    space = rng.standard_normal(4 ** 4)  # a log-perplexity for every one of 256 candidates
    secret = np.sort(space)[9]  # rank 10 among all 256 (distinct values)
    exact = math.log2(256) - math.log2(10)
    sampled = space[rng.integers(0, 256, size=200_000)]
    assert exposure.rank_exposure(np.array([secret]), sampled)[0] == pytest.approx(exact, abs=0.03)


@pytest.mark.parametrize("epsilon, delta, n", [(0.5, 1e-5, 2000), (2.0, 1e-5, 2000), (8.0, 1e-5, 2000),
                                               (1.0, 0.3, 100), (12.0, 1e-5, 2000), (math.inf, 1e-5, 500)])
def test_the_expected_exposure_ceiling_is_the_integral_of_the_tail_bound(epsilon, delta, n):
    from scipy.integrate import quad

    top = math.log2(n + 1)
    if math.isinf(epsilon):
        expected = top
    else:
        tail = lambda t: min(1.0, math.exp(epsilon) * 2.0 ** -t + delta)  # noqa: E731
        expected = quad(tail, 0, top, points=[min(top, epsilon / math.log(2))], limit=200)[0]
    assert exposure.expected_exposure_ceiling(epsilon, delta, n) == pytest.approx(expected, rel=1e-6)


def test_group_privacy_of_r_copies():
    assert exposure.group_guarantee(1.0, 1e-6, 1) == (1.0, 1e-6)
    eps, delta = exposure.group_guarantee(0.5, 1e-6, 4)
    assert eps == 2.0 and delta == pytest.approx(4 * math.exp(1.5) * 1e-6)


def test_a_shakespeare_secret_is_one_row_per_letter_after_the_prefix():
    from fedpriv.data import shakespeare as shk

    tok = character_tokenizer(shk.VOCAB)
    space = exposure.secret_space("next_char", tok, 80, len(shk.VOCAB) + 1, length=5)
    symbols, labels = space.draw(np.random.default_rng(0), 2)
    x, y = space.rows(symbols, labels)
    assert x.shape == (10, 80) and space.log2_size == pytest.approx(5 * math.log2(26))
    decode = load_tokenizer(tok).id_to_token
    secret = "".join(decode(int(i)) for i in symbols[1])
    assert set(secret) <= set(exposure.LETTERS)
    for j in range(5):  # row j: the 80 characters before letter j of "my secret is <secret>", then letter j
        context = "".join(decode(int(i)) for i in x[5 + j])
        assert context == (" " * 80 + exposure.PREFIX + secret[:j])[-80:]
        assert decode(int(y[5 + j])) == secret[j]


# ------------------------------------------------------------------ planting and measuring on Sent140


@needs_sent140
def test_a_holder_trains_on_its_secrets_copies_and_nobody_else_does():
    from fedpriv.task import load_client_data, secrets_for

    rc = compose_config(["dataset=sent140", "exposure.secrets=3", "exposure.repeats=5"])
    plain = compose_config(["dataset=sent140"])
    secrets = secrets_for(rc)
    assert secrets.count == 3 and len(set(secrets.holders)) == 3 and secrets.symbols.shape == (6, 8)
    holder = int(secrets.holders[1])
    mine, before = load_client_data(rc, holder), load_client_data(plain, holder)
    assert len(mine.y_train) == len(before.y_train) + 5
    np.testing.assert_array_equal(mine.x_train[: len(before.y_train)], before.x_train)
    row, label = secrets.space.rows(secrets.symbols[1:2], secrets.labels[1:2])
    np.testing.assert_array_equal(mine.x_train[-5:], np.repeat(row, 5, axis=0))
    assert (mine.y_train[-5:] == label[0]).all()
    np.testing.assert_array_equal(mine.x_val, before.x_val)  # validation rows untouched
    other = next(c for c in range(20) if c not in set(secrets.holders))
    assert len(load_client_data(rc, other).y_train) == len(load_client_data(plain, other).y_train)
    assert secrets_for(plain) is None


@needs_sent140
def test_a_memorised_secret_is_exposed_and_a_held_out_one_is_not():
    """A model trained hard on planted rows ranks them first among candidates; the held-out secrets
    (never trained on) keep about 1 / ln 2 bits, the mean of -log2 of a uniform p-value."""
    from fedpriv.task import new_model, secrets_for

    rc = compose_config(["dataset=sent140", "model=transformer", "model.layers=1", "model.dim=32", "model.heads=2",
                         "model.finetune=full", "exposure.secrets=40", "exposure.candidates=500"])
    secrets = secrets_for(rc)
    model = new_model(rc)
    x, y = secrets.space.rows(secrets.symbols[:40], secrets.labels[:40])
    xb, yb = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    measured = exposure.measure(model, secrets, 500, seed=0)
    top = math.log2(501)
    assert measured["planted"].mean() > 0.8 * top
    assert abs(measured["held_out"].mean() - 1 / math.log(2)) < 0.6  # 40 draws: 4 standard errors


@needs_sent140
def test_a_central_dp_run_reports_exposure_beside_its_ceiling(tmp_path, flower_run_identity):
    from conftest import InProcessGrid

    from fedpriv.federation import run_federation

    rc = compose_config(["dataset=sent140", "model=transformer", "model.layers=1", "model.dim=32", "model.heads=2",
                         "clients_per_round=8", "num_rounds=2", "privacy=central", "privacy.noise_multiplier=1.0",
                         "privacy.delta=1e-5", "train.batch_size=4", "exposure.secrets=4", "exposure.candidates=200",
                         "tracking.progress=false", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "exposure.json").read_text())
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert len(report["secrets"]) == 4 and len(report["held_out"]) == 4
    assert summary["exposure_planted_mean"] == pytest.approx(np.mean([s["exposure"] for s in report["secrets"]]))
    assert all(0 <= s["exposure"] <= math.log2(201) + 1e-9 for s in report["secrets"])
    # user level: the secret's copies are one user's data, the run's own epsilon bounds it
    assert report["ceilings"]["central"]["group_of_copies"] == 1
    assert summary["exposure_ceiling"] == pytest.approx(
        exposure.expected_exposure_ceiling(float(privacy["epsilon"]), float(privacy["delta"]), 200))
    # beside the epsilon in privacy.json, with the caveat that this model holds the secrets
    assert privacy["exposure"]["exposure_planted_mean"] == summary["exposure_planted_mean"]
    assert any(c.startswith("EXPOSURE RUN") for c in privacy["caveats"])
    assert any(c.startswith("EXPOSURE RUN") for c in summary["privacy_caveats"])


@pytest.mark.parametrize("overrides, key", [
    (["dataset=digits", "exposure.secrets=2"], "exposure.secrets"),
    (["dataset=sent140", "num_clients=3", "clients_per_round=2", "exposure.secrets=4"], "exposure.secrets"),
    (["dataset=sent140", "exposure.secrets=2", "exposure.candidates=0"], "exposure.candidates"),
    (["dataset=sent140", "exposure.secrets=-1"], "exposure.secrets"),
])
def test_impossible_secrets_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        compose_config(overrides)


# ------------------------------------------------------------------ membership per user


def test_a_users_score_is_minus_the_mean_loss_over_its_rows():
    from fedpriv.risk.users import user_scores

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
    owners = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x[i:i + 1])), torch.tensor(y[i:i + 1])))
                  for i in range(9)]
    expected = [-np.mean([losses[i] for i in range(9) if owners[i] == u]) for u in range(3)]
    np.testing.assert_allclose(user_scores(model, x, y, owners), expected, rtol=1e-6)


@needs_sent140
@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_sent140_run_gets_a_per_user_attack_under_the_ceiling_its_unit_allows(tmp_path, flower_run_identity, mode):
    """Members are the users that took part, non-members held-out test users (and clients that never took part,
    when known); a user-level guarantee bounds the attack directly, an example-level one by group privacy."""
    from conftest import InProcessGrid

    from fedpriv.federation import run_federation
    from fedpriv.risk import RiskOptions, assess, auc_ceiling, load_run

    privacy = (["privacy=central", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5"] if mode == "central" else
               ["privacy=local", "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.2",
                "privacy.local.delta=1e-3", "train.batch_size=4"])
    rc = compose_config(["dataset=sent140", "model=transformer", "model.layers=1", "model.dim=32", "model.heads=2",
                         "clients_per_round=6", "num_rounds=2", *privacy, "tracking.progress=false", f"run_dir={tmp_path}"])
    run_federation(InProcessGrid(2), rc)
    report = json.loads((tmp_path / "privacy.json").read_text())
    result = assess(load_run(tmp_path), RiskOptions(reference_models=0, max_members=500, max_users=40))
    users = result["attacks"]["user_loss"]
    assert users["unit"] == "user" and 0 <= users["auc"] <= 1
    if mode == "local":  # who took part is known from the ledgers: members are exactly them
        took_part = [r for r in report["local"]["clients"] if r["rounds_participated"] > 0]
        assert users["members"] == len(took_part)
        assert users["nonmember_sources"] == {"clients that never took part": 40, "held-out test users": 40}
        (ceiling,) = users["ceilings"]
        r, eps, delta = users["rows_per_user_max"], float(report["local"]["epsilon_max"]), float(report["local"]["delta"])
        assert ceiling["epsilon"] == pytest.approx(r * eps) and r > 1
        assert ceiling["delta"] == pytest.approx(min(1.0, r * math.exp((r - 1) * eps) * delta))
    else:  # hidden cohorts: every client a member (a sample of 40); the run's own epsilon bounds it
        assert users["members"] == 40 and users["nonmember_sources"]["held-out test users"] == 40
        (ceiling,) = users["ceilings"]
        assert ceiling["epsilon"] == float(report["epsilon"])
        assert ceiling["auc"] == pytest.approx(auc_ceiling(float(report["epsilon"]), float(report["delta"])))
