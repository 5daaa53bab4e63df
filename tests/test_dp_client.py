"""Local DP-SGD clients: Opacus training, per-client ledgers across rounds, budgets.

Every epsilon is checked against an accountant call made here, independently of the ledger code
(dp-accounting's RDP and PLD accountants, Opacus's RDPAccountant), plus pinned literal figures.
"""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import ConfigRecord, Context, RecordDict
from torch import nn
from torch.nn import functional as F

from clients.dp_sgd import DPSGDError, make_dp_compatible, train_dp_sgd
from fedpriv.privacy import local as dp_sgd  # the client's plan, ledger and budget (no Opacus)
from fedpriv.privacy.local import sampling_plan
from clients.local_update import run_local_update
from fedpriv.client_state import ClientStateStore
from fedpriv.compose import compose_config
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor
from fedpriv.models import LogisticRegression, SmallCNN
from fedpriv.task import ClientData

warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")

DELTA = 1e-5
# 2 clients, z = 1, batch 64 of 512 rows (q = 1/8, 8 steps a round), one epoch a round, RDP.
PINNED_RDP = (3.79, 4.70, 5.41)


def local_rc(*extra: str):
    return compose_config([
        "num_clients=2", "clients_per_round=2", "num_rounds=3", "privacy=local",
        "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0", "privacy.accountant=rdp",
        "privacy.secure_rng=false", "train.batch_size=64", "train.local_epochs=1", "train.lr=0.1", *extra,
    ])


def client_data(client_id: int, n: int = 512, seed: int = 0) -> ClientData:
    rng = np.random.default_rng(seed + client_id)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return ClientData(client_id, x, y, x[:0], y[:0])


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def update(rc, cfg, data, model, store):
    """One client's round as the ClientApp runs it: its ledger in its own store, keyed by its id."""
    return run_local_update(rc, cfg, data, model, store, f"client-{data.client_id}")


def independent_rdp(z: float, q: float, steps: int, delta: float = DELTA) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


def independent_pld(z: float, q: float, steps: int, delta: float = DELTA) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


# ------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("n, batch", [(512, 64), (500, 64), (5400, 256), (7, 3), (10, 32)])
def test_sampling_plan_is_what_opacus_loader_does(n, batch):
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
    plan = sampling_plan(n, batch, epochs=3)
    assert plan.sample_rate == pytest.approx(loader.sample_rate, abs=0)
    assert plan.steps_per_epoch == len(loader) and plan.steps == 3 * len(loader)
    if n % batch == 0:
        assert plan.sample_rate == pytest.approx(batch / n)


# ------------------------------------------------------------------ ledger across rounds (unit)


def test_three_rounds_compose_into_one_accountant_call_per_client(tmp_path):
    rc = local_rc()
    store = ClientStateStore(tmp_path)  # one process acting for both virtual clients
    seen: dict[int, list[float]] = {0: [], 1: []}
    for rnd in (1, 2, 3):
        for cid in (0, 1):
            cfg = ConfigRecord({"server-round": rnd, "client-id": cid})
            _, metrics = update(rc, cfg, client_data(cid), LogisticRegression(64, 10), store)
            assert metrics["declined"] == 0.0 and metrics["local_steps"] == 8.0
            seen[cid].append(metrics["local_epsilon"])
    # Each client's figure after round r is ONE accountant call over all 8r steps it took.
    for cid in (0, 1):
        for r, eps in enumerate(seen[cid], start=1):
            assert eps == pytest.approx(independent_rdp(1.0, 0.125, 8 * r), rel=1e-6)
        assert seen[cid] == pytest.approx(list(PINNED_RDP), abs=0.01)
    from opacus.accountants import RDPAccountant

    opacus_acc = RDPAccountant()
    opacus_acc.history = [(1.0, 0.125, 24)]
    assert seen[0][-1] == pytest.approx(opacus_acc.get_epsilon(DELTA), abs=0.01)
    # ...and the ledgers live in the clients' store, one per virtual client, keyed by its id.
    assert store.keys() == ["ledger-client-0", "ledger-client-1"]
    book = dp_sgd.load_client_ledger(store, "client-1")
    assert book.rounds == 3 and book.steps == 24
    assert book.ledger.epsilon(DELTA, "rdp") == pytest.approx(seen[1][-1])


def test_a_client_counts_only_the_rounds_it_took_part_in(tmp_path):
    rc = local_rc()
    store = ClientStateStore(tmp_path)
    for rnd in (1, 2, 3):
        update(rc, ConfigRecord({"server-round": rnd}), client_data(0), LogisticRegression(64, 10), store)
    _, metrics = update(rc, ConfigRecord({"server-round": 3}), client_data(1), LogisticRegression(64, 10), store)
    assert metrics["local_epsilon"] == pytest.approx(PINNED_RDP[0], abs=0.01)  # client 1: one round, its own ledger
    assert metrics["local_rounds"] == 1.0


def test_pld_figure_matches_an_independent_pld_accountant(tmp_path):
    rc = local_rc("privacy.accountant=pld")
    store = ClientStateStore(tmp_path)
    for rnd in (1, 2):
        _, metrics = update(rc, ConfigRecord({"server-round": rnd}), client_data(0), LogisticRegression(64, 10), store)
    eps = independent_pld(1.0, 0.125, 16)
    assert metrics["local_epsilon"] >= eps - 1e-3  # pessimistic PLD: an upper bound
    assert metrics["local_epsilon"] == pytest.approx(eps, rel=0.01)
    assert metrics["local_epsilon"] < PINNED_RDP[1]  # tighter than RDP


def test_reply_arrays_are_the_plain_model_and_metrics_carry_only_covered_figures(tmp_path):
    rc = local_rc()
    model = SmallCNN(1, 8, 10, width=8, groups=4)
    expected_keys = set(model.state_dict())
    store = ClientStateStore(tmp_path)
    arrays, metrics = update(rc, ConfigRecord({"server-round": 1}), client_data(0), model, store)
    keys = set(arrays.keys())
    assert keys == expected_keys and not any(k.startswith("_module.") for k in keys)
    # Only the row count and figures computed from it and the ledger: no raw training loss.
    assert set(metrics) == {"num-examples", "local_epsilon", "local_steps", "local_noise_multiplier",
                            "local_sample_rate", "local_rounds", "declined"}
    _, clipped = update(rc, ConfigRecord({"server-round": 1, "clip-norm": 0.01}), client_data(1),
                        SmallCNN(1, 8, 10, width=8, groups=4), store)
    assert set(clipped) == set(metrics) | {"unclipped"}  # client-side clipping still applies after DP-SGD
    assert clipped["unclipped"] == 0.0


# ------------------------------------------------------------------------------------ budgets


def test_a_client_over_budget_declines_and_keeps_its_ledger(tmp_path):
    # z = 1: 3.79 after one round, 4.70 after two; a budget of 4.2 allows one round only.
    rc = local_rc("privacy.local.target_epsilon=4.2")
    store = ClientStateStore(tmp_path)
    model = LogisticRegression(64, 10)
    _, first = update(rc, ConfigRecord({"server-round": 1}), client_data(0), model, store)
    assert first["declined"] == 0.0
    received_model = LogisticRegression(64, 10)
    received = {k: v.numpy().copy() for k, v in received_model.state_dict().items()}
    arrays, second = update(rc, ConfigRecord({"server-round": 2}), client_data(0), received_model, store)
    assert second["declined"] == 1.0
    assert second["local_epsilon"] == pytest.approx(first["local_epsilon"])  # nothing new was released
    returned = arrays.to_torch_state_dict()
    assert set(returned) == set(received)
    for k, v in returned.items():
        np.testing.assert_array_equal(v.numpy(), received[k])
    book = dp_sgd.load_client_ledger(store, "client-0")
    assert book.rounds == 1 and book.declined == 1


def test_calibrated_noise_spends_the_budget_over_the_planned_rounds(tmp_path):
    rc = local_rc("privacy.local.noise_multiplier=null", "privacy.local.target_epsilon=3.0", "num_rounds=4")
    plan = sampling_plan(512, 64, 1)
    zs = dp_sgd.noise_plan(rc, plan)
    assert len(zs) == 4 and len(set(zs)) == 1  # q = 1: every round, constant schedule
    eps = independent_rdp(zs[0], plan.sample_rate, 4 * plan.steps)
    assert 0.98 * 3.0 <= eps <= 3.0
    store = ClientStateStore(tmp_path)
    figures = []
    for rnd in range(1, 6):
        _, m = update(rc, ConfigRecord({"server-round": rnd}), client_data(0), LogisticRegression(64, 10), store)
        figures.append((m["declined"], m["local_epsilon"]))
    assert [d for d, _ in figures] == [0.0, 0.0, 0.0, 0.0, 1.0]  # the 5th round would overspend
    assert figures[3][1] == pytest.approx(eps, rel=1e-6) and figures[4][1] == figures[3][1] <= 3.0


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("num_rounds=10", "num_clients=10", "clients_per_round=5"), 9),  # ceil(5 + 2 sqrt(2.5)) = 9
        (("num_rounds=10", "num_clients=10", "clients_per_round=10"), 10),  # q = 1: every round
        (("num_rounds=10", "num_clients=100", "clients_per_round=1"), 1),  # ceil(0.1 + 2 sqrt(0.099)) = 1
        (("num_rounds=10", "sampling=all", "num_clients=10", "clients_per_round=2"), 10),
        (("num_rounds=10", "privacy.local.expected_rounds=4"), 4),
    ],
)
def test_planned_participations(extra, expected):
    assert dp_sgd.planned_participations(local_rc(*extra)) == expected


# ------------------------------------------------------------------------- Opacus mechanics


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_dp_sgd_computes_the_clipped_mean_gradient(mode):
    """Noise 0, every row in the batch (q = 1), physical batches of 5: one step equals the mean
    of per-example gradients clipped by hand."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 12)
    torch.manual_seed(0)
    reference = SmallCNN(1, 8, 10, width=8, groups=4)
    model = SmallCNN(1, 8, 10, width=8, groups=4)
    model.load_state_dict(reference.state_dict())
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(len(x)):
        reference.zero_grad()
        F.cross_entropy(reference(torch.from_numpy(x[i : i + 1])), torch.tensor(y[i : i + 1])).backward()
        grads = [p.grad.detach().clone() for p in reference.parameters()]
        factor = min(1.0, 0.5 / (float(torch.sqrt(sum((g**2).sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    result = train_dp_sgd(model, x, y, epochs=1, batch_size=12, lr=1.0, noise_multiplier=0.0, max_grad_norm=0.5,
                          grad_sample_mode=mode, max_physical_batch_size=5, sampling_seed=1, noise_seed=1)
    assert result.steps == 1 and result.examples_seen == 12
    for p, p0, t in zip(result.model.parameters(), reference.parameters(), total):
        torch.testing.assert_close(p.detach(), p0.detach() - t / 12, atol=1e-6, rtol=1e-5)


@functools.cache
def _all_empty_seed() -> int:
    """A sampling seed whose two Poisson draws over 2 rows (q = 1/2) are both empty."""
    x, y = np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)
    for seed in range(200):
        r = train_dp_sgd(LogisticRegression(64, 10), x, y, epochs=1, batch_size=1, lr=0.1, noise_multiplier=0.0,
                         max_grad_norm=1.0, sampling_seed=seed, noise_seed=0)
        if r.examples_seen == 0:
            return seed
    raise AssertionError("no all-empty seed found")


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_empty_poisson_batches_are_noise_only_steps(mode):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 20)
    # q = 1/20: about 36% of the 20 steps draw an empty batch.
    r = train_dp_sgd(SmallCNN(1, 8, 10, width=8, groups=4), x, y, epochs=1, batch_size=1, lr=0.1,
                     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, sampling_seed=0, noise_seed=0)
    assert r.steps == 20 and r.empty_batches > 0
    assert r.opacus_history == [(1.0, 1 / 20, 20)]  # Opacus's own accountant saw every step
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
    # Only empty batches: with noise 0 nothing moves; with noise every parameter moves (never skipped).
    seed = _all_empty_seed()
    x2, y2 = x[:2], y[:2]
    start = SmallCNN(1, 8, 10, width=8, groups=4)
    for z, moves in ((0.0, False), (1.0, True)):
        model = SmallCNN(1, 8, 10, width=8, groups=4)
        model.load_state_dict(start.state_dict())
        r = train_dp_sgd(model, x2, y2, epochs=1, batch_size=1, lr=0.1, noise_multiplier=z, max_grad_norm=1.0,
                         grad_sample_mode=mode, sampling_seed=seed, noise_seed=0)
        assert r.examples_seen == 0 and r.empty_batches == 2 and r.steps == 2 and math.isnan(r.train_loss)
        changed = [not torch.equal(a, b) for a, b in zip(start.parameters(), r.model.parameters())]
        assert all(changed) if moves else not any(changed)


def test_batchnorm_is_replaced_by_groupnorm(tmp_path):
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    fixed = make_dp_compatible(bn)
    kinds = {type(m) for m in fixed.modules()}
    assert nn.GroupNorm in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 32)
    r = train_dp_sgd(bn, x, y, epochs=1, batch_size=8, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0)
    assert any(isinstance(m, nn.GroupNorm) for m in r.model.modules())
    # As a global model it cannot be aggregated (its arrays change): a clear client error.
    with pytest.raises(DPSGDError, match="GroupNorm instead of BatchNorm"):
        update(local_rc(), ConfigRecord({"server-round": 1}), client_data(0), bn, ClientStateStore(tmp_path))


def test_a_model_opacus_cannot_train_is_a_clear_error():
    class RawMatmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(64, 10))

        def forward(self, x):
            return x.flatten(1) @ self.w

    with pytest.raises(DPSGDError, match="grad_sample_mode=ew"):
        train_dp_sgd(RawMatmul(), np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, np.int64), epochs=1, batch_size=4,
                     lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ew")
    with pytest.raises(DPSGDError, match="ghost supports only clipping=flat"):
        train_dp_sgd(LogisticRegression(64, 10), np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, np.int64), epochs=1,
                     batch_size=4, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                     clipping="per_layer")


def test_client_app_turns_a_dp_error_into_an_error_reply(monkeypatch, tmp_path):
    from flwr.app import ArrayRecord, Message, MessageType

    from flwr.supercore.task_identity import TaskIdentity

    import fedpriv.client_app as client_app
    from fedpriv.task import encode_config

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a Flower process sets before messages exist
        monkeypatch.setattr(TaskIdentity, attr, 1)
    rc = local_rc("privacy.local.grad_sample_mode=ghost", "privacy.local.clipping=per_layer")
    model = client_app.new_model(rc)
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "config": ConfigRecord({"task": encode_config(rc), "client-id": 0, "server-round": 1,
                                                    "client-state-dir": str(tmp_path)})}),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )
    reply = client_app.train_handler(msg, context())
    assert reply.has_error() and "ghost supports only clipping=flat" in reply.error.reason


# ------------------------------------------------------------------------------ server monitor


class _Reply:
    def __init__(self, metrics):
        key = metrics.pop("key")
        self.content = {"metrics": metrics, "client": {"key": key}}


def _metrics(cid, eps, rounds, declined=0.0, rows=512):
    return {"num-examples": float(rows), "local_epsilon": eps, "local_steps": 0.0 if declined else 8.0,
            "local_noise_multiplier": 1.0, "local_sample_rate": 0.125, "local_rounds": float(rounds),
            "key": f"client-{cid}", "declined": declined}


def test_monitor_round_metrics_summary_and_report():
    rc = local_rc()
    mon = LocalPrivacyMonitor(rc)
    record = {"local_epsilon": 3.0, "local_rounds": 1.0}  # what Flower averaged
    mon.observe_round(1, [_Reply(_metrics(0, 3.79, 1)), _Reply(_metrics(1, 3.79, 1))], record)
    assert record == {"local_epsilon_max": pytest.approx(3.79), "local_epsilon_mean": pytest.approx(3.79)}
    record = {}
    mon.observe_round(2, [_Reply(_metrics(0, 4.70, 2)), _Reply(_metrics(1, 3.79, 1, declined=1.0))], record)
    assert record["local_epsilon_max"] == pytest.approx(4.70)
    assert record["local_epsilon_mean"] == pytest.approx((4.70 + 3.79) / 2)

    report, details = mon.extend_report(None)  # privacy=local: the monitor writes the report
    assert details is None  # under local DP alone the table is public (zero-out: rows, participation public)
    assert report["mode"] == "local" and report["summary"]["local_epsilon_max"] == pytest.approx(4.70)
    assert report["summary"]["local_delta"] == DELTA
    table = {row["client_id"]: row for row in report["local"]["clients"]}
    assert table["client-0"]["rounds_participated"] == 2 and table["client-0"]["steps"] == 16
    assert table["client-0"]["epsilon"] == pytest.approx(4.70)
    assert table["client-1"]["rounds_participated"] == 1 and table["client-1"]["rounds_declined"] == 1
    assert "Example-level" in report["local"]["guarantee"] and "zero-out" in report["local"]["guarantee"]
    assert report["local"]["neighbouring_relation"].startswith("zero_out")
    json.dumps(report)

    # Under central_local the table would reveal who was sampled: it goes to the operator only.
    both = LocalPrivacyMonitor(local_rc("privacy=central_local", "privacy.local.target_epsilon=5",
                                        "privacy.local.noise_multiplier=1.0"))
    both.observe_round(1, [_Reply(_metrics(0, 3.79, 1)), _Reply(_metrics(1, 3.79, 1))], {})
    central = {"mode": "central_local", "epsilon": 2.0, "summary": {"epsilon": 2.0, "privacy_caveats": ["central note"]}}
    merged, details = both.extend_report(central)
    assert merged["epsilon"] == 2.0 and "local" in merged
    assert merged["summary"]["epsilon"] == 2.0 and merged["summary"]["local_epsilon_bound"] == 5.0
    assert "local_epsilon_max" not in merged["summary"] and "clients" not in merged["local"]
    assert "epsilon_max" not in merged["local"] and "client-0" not in json.dumps(merged)
    assert merged["summary"]["privacy_caveats"][0] == "central note"
    assert {r["client_id"] for r in details["local"]["clients"]} == {"client-0", "client-1"}

    off = LocalPrivacyMonitor(compose_config(["privacy=none"]))
    record = {"x": 1}
    off.observe_round(1, [_Reply(_metrics(0, 1.0, 1))], record)
    assert record == {"x": 1} and off.extend_report(None) == (None, None)


def test_monitor_state_survives_a_checkpoint():
    mon = LocalPrivacyMonitor(local_rc())
    mon.observe_round(1, [_Reply(_metrics(0, 3.79, 1)), _Reply(_metrics(1, 3.79, 1))], {})
    again = LocalPrivacyMonitor(local_rc())
    again.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    again.observe_round(2, [_Reply(_metrics(0, 4.70, 2))], {})
    rows = {r["client_id"]: r for r in again.section()["clients"]}
    assert rows["client-0"]["rounds_participated"] == 2 and rows["client-0"]["steps"] == 16
    assert rows["client-1"]["rounds_participated"] == 1 and again.section()["caveats"][-1:] != ["1 replies"]


def test_monitor_flags_small_clients_and_broken_ledgers():
    mon = LocalPrivacyMonitor(local_rc("privacy.local.delta=0.05"))  # >= 1/50
    mon.observe_round(1, [_Reply(_metrics(0, 0.5, 1, rows=50))], {})
    record: dict = {}
    mon.observe_round(2, [_Reply(_metrics(0, 0.5, 1, rows=50))], record)  # the ledger forgot round 1
    section = mon.section()
    caveats = " ".join(section["caveats"])
    assert "not below 1/n for clients ['client-0']" in caveats
    assert "its state was lost" in caveats
    row = section["clients"][0]
    assert row["rounds_participated"] == 2
    recomputed = independent_rdp(1.0, 0.125, 16, delta=0.05)  # the 16 steps the server saw
    assert recomputed > 0.5 and row["epsilon"] == pytest.approx(recomputed, rel=1e-6)
    assert record["local_epsilon_max"] == pytest.approx(recomputed, rel=1e-6)  # the round's figure too


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_simulation_with_local_dp_keeps_ledgers_and_goes_on_after_declines(tmp_path):
    """privacy=local on Flower's simulation engine: 2 clients, 3 rounds, a budget that allows 2.

    z = 1, one epoch of batch 64: the per-round step count depends on each client's rows, so the
    budget sits between the largest 2-round and the smallest 3-round figure."""
    from fedpriv.simulation import run_simulation
    from fedpriv.task import load_client_data

    base = ["num_clients=2", "clients_per_round=2", "num_rounds=3", "privacy=local", "privacy.local.noise_multiplier=1.0",
            "privacy.accountant=rdp", "train.batch_size=64", "train.local_epochs=1", "tracking.progress=false",
            "placement.num_cpus_per_client=1"]
    rc0 = compose_config(base + ["privacy.local.target_epsilon=null"])
    plans = [sampling_plan(len(load_client_data(rc0, c).x_train), 64, 1) for c in (0, 1)]
    two = [independent_rdp(1.0, p.sample_rate, 2 * p.steps) for p in plans]
    three = [independent_rdp(1.0, p.sample_rate, 3 * p.steps) for p in plans]
    budget = (max(two) + min(three)) / 2
    assert max(two) < budget < min(three)
    rc = compose_config(base + [f"privacy.local.target_epsilon={budget}", f"run_dir={tmp_path}"])
    summary = run_simulation(rc)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_declined"] for r in rows] == [0, 0, 2]  # round 3 goes on without them
    assert [r["num_clients"] for r in rows] == [2, 2, 0]
    one = [independent_rdp(1.0, p.sample_rate, p.steps) for p in plans]
    # The ledger survived between rounds in the client's store: round 2's figure composes both rounds.
    assert rows[0]["local_epsilon_max"] == pytest.approx(max(one), rel=1e-6)
    assert rows[1]["local_epsilon_max"] == pytest.approx(max(two), rel=1e-6)
    assert rows[2]["local_epsilon_max"] == pytest.approx(max(two), rel=1e-6)
    assert summary["local_epsilon_max"] == pytest.approx(max(two), rel=1e-6)
    assert summary["local_epsilon_max"] <= budget
    assert summary["local_delta"] == DELTA and summary["rounds_completed"] == 3
    report = json.loads((tmp_path / "privacy.json").read_text())
    table = {row["client_id"]: row for row in report["local"]["clients"]}
    for c in (0, 1):
        row = table[f"client-{c}"]
        assert row["rounds_participated"] == 2 and row["rounds_declined"] == 1
        assert row["steps"] == 2 * plans[c].steps
        assert row["epsilon"] == pytest.approx(two[c], rel=1e-6)


def test_auto_grad_sample_mode_follows_the_measured_choice_and_trains_with_per_layer_clipping():
    from clients.dp_sgd import choose_grad_sample_mode

    assert choose_grad_sample_mode("auto", "cpu", "flat") == "ghost"  # 1.9x plain SGD on a CPU
    assert choose_grad_sample_mode("auto", "cuda", "flat") == "hooks"  # 4.0x vs ghost's 5.6x on an H200
    assert choose_grad_sample_mode("auto", "cpu", "per_layer") == "hooks"  # ghost clips flat only
    assert choose_grad_sample_mode("ew", "cuda", "flat") == "ew"  # an explicit choice is kept
    assert choose_grad_sample_mode("auto", "cpu", "flat", adapters_only=True) == "hooks"  # LoRA: 1.11x vs ghost 1.71x
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    y = np.arange(40) % 2
    model = torch.nn.Sequential(torch.nn.Linear(8, 2))
    mode = choose_grad_sample_mode("auto", "cpu", "per_layer")
    result = train_dp_sgd(model, x, y, epochs=1, batch_size=10, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
                          grad_sample_mode=mode, clipping="per_layer", sampling_seed=0, noise_seed=0)
    assert result.steps == 4  # q = 1/4: four Poisson steps, each accounted
