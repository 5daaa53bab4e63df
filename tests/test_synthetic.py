"""LEAF Synthetic(alpha, beta), generated per client on demand, and a fleet's O(cohort) path.

Statistics are checked against closed forms of the generative model (never the generator against
itself): feature variances beta^2 + 1 + j^-1.2 across clients and j^-1.2 within one, the spread of
W_k's entries, the lognormal row counts, labels recomputed as argmax of scipy's softmax. Poisson
sampling (drawn as geometric gaps) is checked against the Binomial law it must have.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from conftest import InProcessGrid
from scipy import special, stats

from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.data import client_split, load_dataset
from fedpriv.data.synthetic import (
    DIM,
    MAX_ROWS,
    MIN_ROWS,
    SIGMA_DIAG,
    SyntheticDataset,
    client_params,
    draw_rows,
    row_counts,
    synthetic_dataset,
)
from fedpriv.federation import run_federation
from fedpriv.preflight import client_rows, preflight
from fedpriv.sampling import ClientSampler
from fedpriv.task import dataset_for, load_client_data

QUIET = ["tracking.progress=false"]


# ------------------------------------------------------------------------------ determinism


def test_a_client_is_the_same_whoever_else_was_generated():
    small = synthetic_dataset(1.0, 1.0, 3, 100)
    x, y = small.client_rows(42)
    for k in range(40):  # generate others first, in another order, in a much larger population
        synthetic_dataset(1.0, 1.0, 3, 1_000_000).client_rows(99 - k)
    x2, y2 = synthetic_dataset(1.0, 1.0, 3, 1_000_000).client_rows(42)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (len(y), DIM)
    assert len(y) == small.row_count(42) == int(row_counts(3, np.array([42]))[0])
    other_seed, _ = synthetic_dataset(1.0, 1.0, 4, 100).client_rows(42)
    assert other_seed.shape != x.shape or not np.array_equal(other_seed, x)
    neighbour, _ = small.client_rows(43)
    assert neighbour.shape != x.shape or not np.array_equal(neighbour, x)


def test_row_counts_vectorised_equal_one_at_a_time():
    ids = np.array([5, 1023, 1024, 77_777, 999_999, 5])
    ds = synthetic_dataset(1.0, 1.0, 0, 1_000_000)
    assert list(row_counts(0, ids)) == [ds.row_count(int(i)) for i in ids]


def test_a_run_client_s_rows_are_split_into_train_and_validation():
    rc = compose_config(["dataset=synthetic", "num_clients=1000", "data.val_fraction=0.1"])
    data = load_client_data(rc, 17)
    x, y = dataset_for(rc).client_rows(17)
    n = len(y)
    assert len(data.y_train) + len(data.y_val) == n and len(data.y_val) == math.floor(0.1 * n)
    rows = {r.tobytes() for r in x}
    assert {r.tobytes() for r in np.concatenate([data.x_train, data.x_val])} == rows
    again = load_client_data(rc, 17)
    assert np.array_equal(again.x_train, data.x_train) and np.array_equal(again.y_val, data.y_val)


# ------------------------------------------------------------------ statistics vs closed forms


def test_features_within_one_client_have_mean_v_and_variance_sigma():
    w, b, v, rng = client_params(11, 1.0, 1.0, 7)
    n = 100_000
    x, _ = draw_rows(rng, w, b, v, n)
    x = x.astype(np.float64)
    # Mean: v_j +- 5 standard errors sqrt(Sigma_jj / n).
    assert np.all(np.abs(x.mean(0) - v) < 5 * np.sqrt(SIGMA_DIAG / n))
    # Variance: (n-1) s^2 / Sigma_jj ~ chi2(n-1): each feature within its two-sided 1e-4 quantiles.
    ratio = x.var(0, ddof=1) / SIGMA_DIAG * (n - 1)
    lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], n - 1)
    assert np.all((ratio > lo) & (ratio < hi)), ratio / (n - 1)
    # Diagonal covariance: off-diagonal correlations ~ N(0, 1/n).
    corr = np.corrcoef(x[:, :10].T)[np.triu_indices(10, 1)]
    assert np.all(np.abs(corr) < 5 / math.sqrt(n))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (0.0, 0.0)])
def test_across_clients_features_and_models_spread_as_the_model_says(alpha, beta):
    clients = 3000
    ds = synthetic_dataset(alpha, beta, 5, clients)
    first = np.stack([ds.client_rows(k)[0][0] for k in range(clients)]).astype(np.float64)  # one row per client
    # x_j = B_k + (v_kj - B_k) + noise: variance beta^2 + 1 + Sigma_jj, independent across clients.
    expected = beta**2 + 1 + SIGMA_DIAG
    ratio = first.var(0, ddof=1) / expected * (clients - 1)
    lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], clients - 1)
    assert np.all((ratio > lo) & (ratio < hi)), ratio / (clients - 1)
    # A client's W_k entries share the mean u_k ~ N(0, alpha^2): the per-client mean of its 600
    # entries has variance alpha^2 + 1/600 across clients; one entry has alpha^2 + 1.
    ws = np.stack([client_params(5, alpha, beta, k)[0] for k in range(clients)])
    for values, var in ((ws.reshape(clients, -1).mean(1), alpha**2 + 1 / ws[0].size), (ws[:, 0, 0], alpha**2 + 1)):
        r = values.var(ddof=1) / var * (clients - 1)
        assert lo < r < hi, r / (clients - 1)


def test_labels_are_the_argmax_of_the_client_s_softmax():
    ds = synthetic_dataset(1.0, 1.0, 2, 50)
    for k in range(20):
        w, b, _, _ = client_params(2, 1.0, 1.0, k)
        x, y = ds.client_rows(k)
        probs = special.softmax(x.astype(np.float64) @ w.T + b, axis=1)
        assert np.array_equal(y, probs.argmax(1))
        assert y.min() >= 0 and y.max() < 10


def test_row_counts_follow_the_capped_lognormal():
    n = 200_000
    counts = row_counts(9, np.arange(n))
    assert counts.min() >= MIN_ROWS and counts.max() <= MAX_ROWS
    # P(count <= m) = P(floor(L) + 50 <= m) = P(L < m - 49) = Phi((ln(m - 49) - 4) / 2) for m < 1000;
    # P(count = 1000) = P(L >= 950). Each observed share within 5 binomial standard errors.
    for m in (50, 60, 104, 300, 999):
        p = stats.norm.cdf((math.log(m - 49) - 4.0) / 2.0)
        assert abs(np.mean(counts <= m) - p) < 5 * math.sqrt(p * (1 - p) / n), m
    p_cap = stats.norm.sf((math.log(950) - 4.0) / 2.0)
    assert abs(np.mean(counts == MAX_ROWS) - p_cap) < 5 * math.sqrt(p_cap * (1 - p_cap) / n)


def test_iid_variant_shares_one_model_and_centres_features():
    w0, b0, v0, _ = client_params(1, 1.0, 1.0, 0, iid=True)
    w9, b9, v9, _ = client_params(1, 3.0, 3.0, 99_999, iid=True)
    assert np.array_equal(w0, w9) and np.array_equal(b0, b9) and not v0.any() and not v9.any()
    ds = synthetic_dataset(1.0, 1.0, 1, 100, True)
    x, y = ds.client_rows(3)
    assert np.array_equal(y, (x.astype(np.float64) @ w0.T + b0).argmax(1))


def test_central_test_split_is_fresh_rows_of_the_first_clients():
    ds = synthetic_dataset(1.0, 1.0, 0, 1_000_000)
    assert ds.x_test.shape == (200 * 50, DIM) and len(ds.y_train) == 0
    train = {r.tobytes() for k in range(200) for r in ds.client_rows(k)[0]}
    assert not any(r.tobytes() in train for r in ds.x_test)  # never a client's own row
    assert synthetic_dataset(1.0, 1.0, 0, 30).x_test.shape == (30 * 50, DIM)
    # Test row i of client k is labelled by client k's model.
    w, b, _, _ = client_params(0, 1.0, 1.0, 3)
    assert np.array_equal(ds.y_test[150:200], (ds.x_test[150:200].astype(np.float64) @ w.T + b).argmax(1))
    assert load_dataset("synthetic").population == 1000


# ------------------------------------------------------------------------ memory: O(one client)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_last_client_of_a_million_costs_one_client_s_memory():
    def last_of(population: int, seed: int):
        def run():
            ds = synthetic_dataset(1.0, 1.0, seed, population)
            _, y = ds.client_rows(population - 1)
            assert len(y) == ds.row_count(population - 1)
        return run

    million = _peak_bytes(last_of(1_000_000, 1234))
    thousand = _peak_bytes(last_of(1_000, 1235))
    # The test split (10,000 rows, 2.4 MB) and one client (<= 240 kB) in both; a materialised
    # population of a million would be ~57 GB, its row counts alone 8 MB.
    assert million < 16 * 2**20, million
    assert abs(million - thousand) < 2**20, (million, thousand)


def test_poisson_sampling_of_a_million_is_o_cohort_and_binomial():
    sampler = ClientSampler("poisson", 1_000_000, 100, 0)
    assert _peak_bytes(sampler.sample) < 64 * 1024  # random(1e6) alone would be 8 MB
    small = ClientSampler("poisson", 200, 20, 1)
    rounds = 20_000
    hits, sizes = np.zeros(200), []
    for _ in range(rounds):
        cohort = small.sample()
        assert np.all(np.diff(cohort) > 0) and cohort.min(initial=0) >= 0 and cohort.max(initial=0) < 200
        hits[cohort] += 1
        sizes.append(len(cohort))
    q = 0.1
    # Each client: Binomial(rounds, q); the cohort size: Binomial(200, q) (mean 20, variance 18).
    assert np.all(np.abs(hits - rounds * q) < 5 * math.sqrt(rounds * q * (1 - q)))
    assert abs(np.mean(sizes) - 20) < 5 * math.sqrt(18 / rounds)
    var = np.var(sizes, ddof=1) * (rounds - 1) / 18
    assert stats.chi2.ppf(1e-4, rounds - 1) < var < stats.chi2.ppf(1 - 1e-4, rounds - 1)
    assert len(ClientSampler("poisson", 50, 50, 2).sample()) == 50  # q = 1: everyone


# ------------------------------------------------------------------------ configuration, preflight


@pytest.mark.parametrize("override,key", [
    ("dataset.alpha=-0.5", "dataset.alpha"), ("dataset.beta=-1", "dataset.beta"), ("partition=iid", "partition.scheme"),
])
def test_bad_synthetic_settings_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        compose_config(["dataset=synthetic", override])
    assert f"config key '{key}'" in str(err.value) and "\n" not in str(err.value)


def test_a_client_outside_the_population_is_refused():
    with pytest.raises(ValueError, match="client 30 does not exist"):
        synthetic_dataset(1.0, 1.0, 0, 30).client_rows(30)


def test_preflight_of_a_million_clients_builds_no_client(tmp_path, monkeypatch):
    rc = compose_config(["dataset=synthetic", "num_clients=1000000", "clients_per_round=100", "privacy=local",
                         "privacy.local.target_epsilon=8", f"run_dir={tmp_path / 'run'}", *QUIET])

    def no_client(*_):
        raise AssertionError("preflight generated a client's rows or row count")

    with monkeypatch.context() as patch:
        patch.setattr(SyntheticDataset, "client_rows", no_client)
        patch.setattr(SyntheticDataset, "row_count", no_client)
        assert preflight(rc) == []
        rows = client_rows(rc, dataset_for(rc))
    ds = dataset_for(rc)
    # Every possible count (50..1000 rows less the validation split) and nothing a client cannot have.
    assert rows.min() == len(load_client_data_rows(50)) and rows.max() == len(load_client_data_rows(1000))
    sample = [len(load_client_data(rc, k).y_train) for k in (0, 1, 999_999)]
    assert set(sample) <= set(rows.tolist()) and ds.population == 1_000_000


def load_client_data_rows(n: int) -> np.ndarray:
    return client_split(np.arange(n), 0.1, 0, 0)[0]


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("flower_run_identity")
def test_a_fleet_of_100000_runs_central_dp_through_the_engine(tmp_path):
    rc = compose_config(["dataset=synthetic", "num_clients=100000", "clients_per_round=20", "num_rounds=2",
                         "privacy=central", "privacy.target_epsilon=8", f"run_dir={tmp_path}", *QUIET])
    summary = run_federation(InProcessGrid(2), rc)
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed"
    raw = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)
    assert all(r["num_failed"] == 0 for r in raw) and sum(r["num_sampled"] for r in raw) > 0
    assert math.isfinite(summary["final_accuracy"])


@pytest.mark.usefixtures("flower_run_identity")
def test_the_recipe_learns(tmp_path):
    rc = compose_config(["dataset=synthetic", "num_rounds=10", f"run_dir={tmp_path}", *QUIET])
    run_federation(InProcessGrid(2), rc)
    acc = [r["test_accuracy"] for r in run_folder.read_metrics(tmp_path)]
    # Chance is ~0.1-0.35 (the most frequent class of the test split); FedAvg over 30 clients climbs.
    majority = np.bincount(dataset_for(rc).y_test).max() / len(dataset_for(rc).y_test)
    assert acc[-1] > max(acc[0], majority) + 0.03, (acc, majority)
