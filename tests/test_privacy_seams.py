"""Privacy at the seams: restarts, client identity, what replies and files publish, resume rules.

Most tests drive the real round loop (``run_federation``) and the real ClientApp in this process
through :class:`conftest.InProcessGrid` (no Ray), so a restart is a new grid: every node's
Flower context is gone, as after a crash of the simulation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpriv.privacy.local import sampling_plan
from clients.identity import ClientIdentityError, client_key
from conftest import InProcessGrid
from fedpriv import run_folder
from fedpriv.callbacks import Callback
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.federation import run_federation
from fedpriv.launch import final_report
from fedpriv.privacy.disclosure import ALWAYS_PUBLIC, split_round
from fedpriv.run_folder import RunFolderError, check_run_folder
from fedpriv.sampling import ClientSampler
from fedpriv.task import load_client_data
from strategies import build_aggregator

pytestmark = pytest.mark.usefixtures("flower_run_identity")

QUIET = ["tracking.progress=false"]


def rdp_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """Independent of the ledger code: dp-accounting's RDP accountant, called directly."""
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


class CrashAfter(Callback):
    """The process dies once round ``rnd`` is recorded and published (a callback after the others)."""

    def __init__(self, rnd: int):
        self.rnd = rnd

    def after_round(self, state, result):
        if result.server_round == self.rnd:
            raise RuntimeError(f"simulated crash after round {self.rnd}")
        return False


# ------------------------------------------------------------------ 1. local DP across a restart

LOCAL = ["num_clients=6", "clients_per_round=6", "sampling=all", "num_rounds=4", "privacy=local",
         "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0", "privacy.accountant=rdp",
         "train.batch_size=64", "privacy.local.grad_sample_mode=hooks", *QUIET]


def client_epsilons(run_dir) -> dict[str, float]:
    report = json.loads((run_dir / "privacy.json").read_text())
    return {row["client_id"]: row["epsilon"] for row in report["local"]["clients"]}


def test_local_ledgers_survive_a_restart_of_the_simulation(tmp_path):
    """6 clients, every round, killed after round 3 of 4 and resumed on fresh nodes: the same
    per-client epsilons as the uninterrupted run, and as an independent accountant's."""
    whole = tmp_path / "whole"
    run_federation(InProcessGrid(3), compose_config(LOCAL + [f"run_dir={whole}"]))

    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="simulated crash after round 3"):
        run_federation(InProcessGrid(3), compose_config(LOCAL + [f"run_dir={broken}"]), [CrashAfter(3)])
    summary = run_federation(InProcessGrid(3), compose_config(LOCAL + [f"run_dir={broken}", "resume=true"]))

    rc = compose_config(LOCAL)
    expected = {}
    for c in range(6):
        plan = sampling_plan(len(load_client_data(rc, c).x_train), 64, 1)
        expected[f"client-{c}"] = rdp_epsilon(1.0, plan.sample_rate, 4 * plan.steps, 1e-5)
    assert client_epsilons(broken) == pytest.approx(expected, rel=1e-9)
    assert client_epsilons(whole) == pytest.approx(expected, rel=1e-9)
    assert summary["local_epsilon_max"] == pytest.approx(max(expected.values()), rel=1e-9)
    rows = json.loads((broken / "privacy.json").read_text())["local"]["clients"]
    assert all(r["rounds_participated"] == 4 and r["steps"] > 0 for r in rows)
    assert len(run_folder.read_metrics(broken)) == 4
    # The simulated clients' own ledgers are on their 'disks', with the run, operator-only.
    assert len(list((broken / run_folder.SIMULATED_CLIENT_STATE).glob("ledger-client-*.json"))) == 6


def _node_message(rc, server_round: int, position: int, run_id: str = "run-a") -> Message:
    from fedpriv.task import encode_config, new_model

    return Message(
        content=RecordDict({
            "arrays": ArrayRecord(new_model(rc).state_dict()),
            "config": ConfigRecord({"task": encode_config(rc), "client-id": position, "server-round": server_round,
                                    "run-id": run_id}),
        }),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )


def _fresh_node(node_config: dict) -> Context:
    """A SuperNode just (re)started: Flower's context.state is empty."""
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_restarted_supernode_continues_its_ledger_and_keeps_refusing(tmp_path):
    """Deployment: the ledger lives in the node's state-dir; a restart (fresh context) and a shift
    of its position among the connected nodes (another node dropped out) change nothing."""
    import fedpriv.client_app as client_app

    owner = tmp_path / "owner.npz"
    rng = np.random.default_rng(0)
    np.savez(owner, x_train=rng.normal(size=(256, 64)).astype(np.float32), y_train=rng.integers(0, 10, 256))
    node_config = {"data-path": str(owner), "state-dir": str(tmp_path / "state")}
    plan = sampling_plan(256, 64, 1)
    one, two = (rdp_epsilon(1.0, plan.sample_rate, k * plan.steps, 1e-5) for k in (1, 2))
    budget = (one + two) / 2  # allows one round, not two
    rc_budget = compose_config(["client_mode=nodes", "num_clients=2", "clients_per_round=2", "sampling=all",
                                "privacy=local", "privacy.local.noise_multiplier=1.0", "privacy.accountant=rdp",
                                "train.batch_size=64", f"privacy.local.target_epsilon={budget}", *QUIET])

    first = client_app.train_handler(_node_message(rc_budget, 1, position=1), _fresh_node(node_config))
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    assert first.content["metrics"]["declined"] == 0.0
    assert first.content["metrics"]["local_epsilon"] == pytest.approx(one, rel=1e-9)
    key = first.content["client"]["key"]
    # Restarted node, and it is now at position 0 (node 0 left): same key, same ledger, declines.
    second = client_app.train_handler(_node_message(rc_budget, 2, position=0), _fresh_node(node_config))
    assert second.content["client"]["key"] == key
    assert second.content["metrics"]["declined"] == 1.0
    assert second.content["metrics"]["local_epsilon"] == pytest.approx(one, rel=1e-9)
    assert second.content["metrics"]["local_rounds"] == 1.0
    # A new run id (another run, or a server that wants a fresh ledger) selects nothing: the spend
    # of every run over the same data composes, and the client still refuses.
    other = client_app.train_handler(_node_message(rc_budget, 1, position=0, run_id="run-b"), _fresh_node(node_config))
    assert other.content["metrics"]["declined"] == 1.0
    assert other.content["metrics"]["local_epsilon"] == pytest.approx(one, rel=1e-9)


def test_the_ledger_key_depends_on_the_node_alone(tmp_path):
    a = {"data-path": str(tmp_path / "a.npz")}
    assert client_key("nodes", 0, a) == client_key("nodes", 5, a)  # not its position among nodes
    assert client_key("nodes", 0, a) != client_key("nodes", 0, {"data-path": str(tmp_path / "b.npz")})
    assert client_key("nodes", 3, {"partition-id": 2, "num-partitions": 4}) == "partition-2-of-4"
    assert client_key("nodes", 3, {"client-id": "hospital-7", "data-path": "x"}) == "node-hospital-7"
    assert client_key("virtual", 3, {}) == "client-3"
    with pytest.raises(ClientIdentityError, match="client-id"):
        client_key("nodes", 0, {})


# ------------------------------------------------------------------ 3. what a DP-SGD client sends


def test_a_local_dp_reply_carries_no_raw_training_loss(tmp_path):
    run_federation(InProcessGrid(2), compose_config(LOCAL + ["num_rounds=1", f"run_dir={tmp_path}"]))
    record = run_folder.read_metrics(tmp_path)[0]
    assert "train_loss" not in record
    diagnostics = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)
    assert all("train_loss" not in r for r in diagnostics)


# ------------------------------------------------------------------ 4. what artifacts publish

CENTRAL = ["num_clients=8", "clients_per_round=4", "num_rounds=2", "privacy=central", "privacy.target_epsilon=4",
           *QUIET]


def test_published_files_carry_only_covered_figures_and_the_checkpoint_no_randomness(tmp_path):
    run_federation(InProcessGrid(2), compose_config(CENTRAL + [f"run_dir={tmp_path}"]))
    covered = set(build_aggregator(compose_config(CENTRAL)).covered_metric_keys())
    assert "clipped_fraction" not in covered  # fixed clipping: the fraction is raw
    for record in run_folder.read_metrics(tmp_path):
        assert set(record) <= set(ALWAYS_PUBLIC) | covered, set(record) - set(ALWAYS_PUBLIC) - covered
    raw = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)
    assert len(raw) == 2 and {"num_sampled", "cohort_size", "snr", "update_norm_p50", "num_failed"} <= set(raw[0])
    report = json.loads((tmp_path / "privacy.json").read_text())
    caveat = next(c for c in report["caveats"] if c.startswith("raw per-round diagnostics"))
    for key in raw[0]:
        if key != "round":
            assert key in caveat  # the caveat names every raw figure
    assert "wall_seconds" in caveat and {"metrics.jsonl", "operator_only/", "checkpoint.pt"} <= set(report["outputs"])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["sampler"]["bit_generator"] is None  # secure_rng: cohorts cannot be rebuilt
    assert "rng" not in checkpoint["aggregator"]


def test_a_secure_sampler_is_reseeded_on_resume_and_a_seeded_one_continues():
    secure = ClientSampler("poisson", 1000, 100, None)
    state = secure.state_dict()
    assert state == {"bit_generator": None}
    again = ClientSampler("poisson", 1000, 100, None)
    again.load_state_dict(state)
    assert not np.array_equal(secure.sample(), again.sample())
    seeded = ClientSampler("poisson", 1000, 100, 7)
    seeded.sample()
    copy = ClientSampler("poisson", 1000, 100, 7)
    copy.load_state_dict(seeded.state_dict())
    assert np.array_equal(seeded.sample(), copy.sample())


@pytest.mark.parametrize("mode, public", [
    ("none", {"round", "epsilon", "num_sampled", "round_seconds", "train_loss", "local_epsilon_max"}),
    ("local", {"round", "num_sampled", "local_epsilon_max"}),
    ("central", {"round", "epsilon"}),
    ("central_local", {"round", "epsilon"}),
])
def test_split_round_publishes_by_the_allow_list(mode, public):
    record = {"round": 3, "epsilon": 1.0, "num_sampled": 9, "round_seconds": 1.5, "train_loss": 0.3,
              "local_epsilon_max": 2.0}
    published, operator = split_round(record, mode, ("epsilon",) if "central" in mode else ())
    assert set(published) == public & set(record)
    assert set(operator) == ((set(record) - public) | {"round"} if set(record) - public else set())


def test_central_local_keeps_the_client_table_for_the_operator(tmp_path):
    both = ["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=2", "privacy=central_local", "privacy.target_epsilon=5",
            "privacy.local.target_epsilon=20", "train.batch_size=64", "privacy.local.grad_sample_mode=hooks", *QUIET]
    summary = run_federation(InProcessGrid(2), compose_config(both + [f"run_dir={tmp_path}"]))
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert "clients" not in report["local"] and "epsilon_max" not in report["local"]
    assert summary["local_epsilon_bound"] == 20.0 and "local_epsilon_max" not in summary
    assert all("local_epsilon_max" not in r for r in run_folder.read_metrics(tmp_path))
    details = json.loads((tmp_path / run_folder.PRIVACY_DETAILS).read_text())
    assert details["local"]["clients"] and all(r["epsilon"] <= 20.0 for r in details["local"]["clients"])


def test_wandb_gets_operator_diagnostics_only_when_asked(tmp_path):
    from fedpriv.tracking.wandb_tracker import WandbTracker

    logged = []

    class Run:
        def log(self, data, step):
            logged.append(data)

    for opt_in in (False, True):
        rc = compose_config([f"tracking.operator_diagnostics={str(opt_in).lower()}", "tracking=wandb"])
        tracker = WandbTracker(rc, tmp_path)
        tracker.run = Run()
        tracker.log_round({"round": 1, "epsilon": 1.0}, {"round": 1, "num_sampled": 5})
    assert logged[0] == {"round": 1, "epsilon": 1.0}
    assert logged[1] == {"round": 1, "epsilon": 1.0, "operator/num_sampled": 5}


# ------------------------------------------------------------------ 5. recorded before published


def test_a_round_is_recorded_before_it_is_published(tmp_path, monkeypatch):
    """A crash while publishing round 2 (a tracker failing after metrics.jsonl was written) must
    leave no published round that the checkpoint's ledger lacks; the resumed run publishes round 2
    from the checkpoint and never releases it again."""
    from fedpriv.tracking import Trackers

    calls = {"n": 0}
    original = Trackers.log_round

    def failing(self, record, operator=None):
        original(self, record, operator)
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("tracker died")

    monkeypatch.setattr(Trackers, "log_round", failing)
    rc = compose_config(CENTRAL + ["num_rounds=3", f"run_dir={tmp_path}"])
    with pytest.raises(OSError):
        run_federation(InProcessGrid(2), rc)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    published = [r["round"] for r in run_folder.read_metrics(tmp_path)]
    assert max(published) <= checkpoint["round"]
    assert len(checkpoint["aggregator"]["ledger"]["events"]) >= 1
    monkeypatch.setattr(Trackers, "log_round", original)

    # Simulate the other crash point: checkpoint written, nothing published (drop round 2's line).
    run_folder.keep_rounds_up_to(tmp_path / "metrics.jsonl", 1)
    resumed = compose_config(CENTRAL + ["num_rounds=3", f"run_dir={tmp_path}", "resume=true"])
    summary = run_federation(InProcessGrid(2), resumed)
    rounds = run_folder.read_metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["epsilon"] == pytest.approx(checkpoint["records"]["published"]["epsilon"])
    report = json.loads((tmp_path / "privacy.json").read_text())
    released = sum(e.get("count", 1) for e in report["events"])
    assert released == 3 and summary["rounds_completed"] == 3  # round 2 released once


# ------------------------------------------------------------------ robustness of the mechanism


def _reply_with(arrays, metrics):
    from fedpriv.updates import to_record

    return Message(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}),
                   dst_node_id=0, message_type="train")


@pytest.mark.parametrize("client_mode", ["virtual", "nodes"])
def test_malformed_or_non_finite_replies_are_rejected_not_aggregated(tmp_path, client_mode):
    """Simulation (a worker's share per message, here one client each) and deployment (one
    client per SuperNode): a NaN update or an unclipped bit of 1e6 is rejected, counted failed."""
    def tamper(reply):
        if reply.has_error():
            return reply
        tamper.n += 1
        state = reply.content["arrays"].to_torch_state_dict()
        if tamper.n % 3 == 1:  # a NaN update
            first = next(iter(state))
            state[first] = state[first].clone().fill_(float("nan"))
        elif tamper.n % 3 == 2:  # a huge unclipped bit
            if "diagnostics" in reply.content:
                reply.content["diagnostics"]["unclipped"] = [1e6]
            else:
                reply.content["metrics"]["unclipped"] = 1e6
        reply.content["arrays"] = ArrayRecord(state)
        return reply

    tamper.n = 0
    rc = compose_config(["num_clients=6", "clients_per_round=6", "sampling=all", "num_rounds=2", "privacy=central",
                         "privacy.target_epsilon=8", "privacy.clipping=adaptive", "privacy.clip_on=client",
                         "strategy=fedavg", f"client_mode={client_mode}", "placement.num_nodes=6", *QUIET,
                         f"run_dir={tmp_path}"])
    node_configs = [{"partition-id": i, "num-partitions": 6, "state-dir": str(tmp_path / "state")} for i in range(6)]
    grid = InProcessGrid(6, tamper=tamper, node_configs=node_configs if client_mode == "nodes" else None)
    summary = run_federation(grid, rc)
    raw = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)
    assert [r["num_failed"] for r in raw] == [4, 4] and [r["num_clients"] for r in raw] == [2, 2]
    assert math.isfinite(summary["final_loss"])
    norms = [r["clip_norm"] for r in run_folder.read_metrics(tmp_path)]
    assert all(0.1 < n < 10 for n in norms)
    model = torch.load(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.values())


def test_a_share_whose_sum_exceeds_its_clients_bound_is_rejected(tmp_path):
    """A worker's clipped sum can hold at most clients x C of norm; more is rejected."""
    def inflate(reply):
        if not reply.has_error():
            state = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: v * 1000 + 1 for k, v in state.items()})
        return reply

    rc = compose_config(CENTRAL + ["sampling=all", "clients_per_round=8", f"run_dir={tmp_path}"])
    run_federation(InProcessGrid(2, tamper=inflate), rc)
    raw = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)
    assert [r["num_clients"] for r in raw] == [0, 0] and [r["num_failed"] for r in raw] == [8, 8]


def test_plain_aggregation_rejects_a_non_finite_weight():
    agg = build_aggregator(compose_config([]))
    arrays = {"w": np.zeros(3, dtype=np.float32)}
    assert agg.reply_problem(_reply_with(arrays, {"num-examples": float("inf")}), arrays) is not None
    assert agg.reply_problem(_reply_with({"w": np.zeros(4, dtype=np.float32)}, {"num-examples": 1.0}), arrays)
    assert agg.reply_problem(_reply_with(arrays, {"num-examples": 3.0}), arrays) is None


# ------------------------------------------------------------------ resume and run folders


def _finished_run(tmp_path):
    run_dir = tmp_path / "run"
    run_federation(InProcessGrid(2), compose_config(CENTRAL + [f"run_dir={run_dir}"]))
    (run_dir / "config.yaml").write_text("seed: 0\n")
    return run_dir


def test_resume_of_a_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        check_run_folder(compose_config(CENTRAL + [f"run_dir={tmp_path / 'typo'}", "resume=true"]))
    (tmp_path / "notes").mkdir()
    with pytest.raises(RunFolderError, match="not a run folder"):
        check_run_folder(compose_config(CENTRAL + [f"run_dir={tmp_path / 'notes'}", "resume=true"]))


def test_a_rejected_resume_leaves_the_folder_untouched(tmp_path):
    run_dir = _finished_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match="seed"):
        run_federation(InProcessGrid(2), compose_config(CENTRAL + [f"run_dir={run_dir}", "resume=true", "seed=3"]))
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    before["checkpoint.pt"] = b"garbage"
    with pytest.raises(RunFolderError, match="unreadable"):
        check_run_folder(compose_config(CENTRAL + [f"run_dir={run_dir}", "resume=true"]))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path):
    run_dir = _finished_run(tmp_path)
    with pytest.raises(RunFolderError, match="already holds a run"):
        run_federation(InProcessGrid(2), compose_config(CENTRAL + [f"run_dir={run_dir}"]))


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError):
        run_federation(InProcessGrid(2), compose_config(CENTRAL + [f"run_dir={run_dir}"]), [CrashAfter(1)])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"round": 2, "test_acc')  # the process died mid-line
    summary = run_federation(InProcessGrid(2), compose_config(CENTRAL + [f"run_dir={run_dir}", "resume=true"]))
    assert [r["round"] for r in run_folder.read_metrics(run_dir)] == [1, 2] and summary["rounds_completed"] == 2


def test_a_budget_spent_before_round_one_is_refused_and_zero_rounds_report_cleanly():
    with pytest.raises(ConfigError, match="spent before round 1"):
        build_aggregator(compose_config(["privacy=central", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=0.1"]))
    rc = compose_config(["privacy=central", "privacy.target_epsilon=1"])
    text = final_report({"rounds_completed": 0, "rounds_planned": 5, "stop_reason": "privacy budget",
                         "final_accuracy": None, "wall_seconds": 1.0, "epsilon": 0.0, "delta": 1e-5}, rc)
    assert "n/a (no round completed)" in text


# ------------------------------------------------------------------ words


def test_the_report_states_the_relation_each_sampling_really_holds_under(tmp_path):
    fixed = tmp_path / "fixed"
    run_federation(InProcessGrid(2), compose_config(CENTRAL + ["sampling=fixed", f"run_dir={fixed}"]))
    report = json.loads((fixed / "privacy.json").read_text())
    assert "replace-one" in report["guarantee"] and "adding or removing" not in report["guarantee"]
    assert report["neighbouring_relation"] == "replace_one"
    cohort = compose_config(CENTRAL + ["privacy.noise_cohort_size=1000"])
    caveat = " ".join(build_aggregator(cohort).plan.caveats)
    assert "epsilon holds for this run as simulated" in caveat and "accuracy" in caveat


def test_a_deployment_reply_posing_as_a_share_or_missing_its_metrics_is_counted_failed(tmp_path):
    """One SuperNode is one client: a reply claiming to be a share of many (a way to put n x C into
    the sum) or one without metrics is counted failed; the round and the run go on."""
    def tamper(reply):
        if reply.has_error():
            return reply
        tamper.n += 1
        if tamper.n % 3 == 1:
            reply.content["metrics"]["clients-trained"] = 5
        elif tamper.n % 3 == 2:
            reply.content = RecordDict({"arrays": reply.content["arrays"]})
        return reply

    tamper.n = 0
    rc = compose_config(["num_clients=6", "clients_per_round=6", "sampling=all", "num_rounds=2", "privacy=central",
                         "privacy.target_epsilon=8", "client_mode=nodes", *QUIET, f"run_dir={tmp_path}"])
    node_configs = [{"partition-id": i, "num-partitions": 6} for i in range(6)]
    summary = run_federation(InProcessGrid(6, tamper=tamper, node_configs=node_configs), rc)
    raw = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)
    assert [r["num_failed"] for r in raw] == [4, 4] and [r["num_clients"] for r in raw] == [2, 2]
    assert summary["rounds_completed"] == 2 and math.isfinite(summary["final_loss"])
