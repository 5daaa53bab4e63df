"""privacy=distributed's round: the server's four exchanges with real clients (clients.secagg_share),
in this process through a stand-in for the engine's population that can lose clients at any stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from clients.secagg_share import secagg_stage
from fedpriv import updates
from fedpriv.client_state import ClientStateStore
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError, to_dict
from fedpriv.privacy import skellam
from fedpriv.task import new_model
from strategies import build_aggregator
from conftest import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_run_identity")

BASE = ("num_clients=40 clients_per_round=10 num_rounds=4 privacy=distributed privacy.target_epsilon=4 "
        "privacy.distributed.min_survivors=5 train.local_epochs=1")


class Population:
    """The engine's Population, minus Ray: one message per client, answered by secagg_stage in this
    process; ``lose[stage]`` are clients whose answer to that stage never comes (a dropout)."""

    uses_shares = False

    def __init__(self, rc, store_dir, lose=None):
        self.rc, self.store, self.lose = rc, ClientStateStore(store_dir), lose or {}
        self.task = json.dumps(to_dict(rc))
        self.sent_back = []  # every reply's content, as the server receives it

    def messages(self, cohort, server_round, arrays, config):
        return [(Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
            {**config, "task": self.task, "server-round": server_round, "run-id": "t", "client-id": int(c)})}),
            message_type=MessageType.TRAIN, dst_node_id=int(c) + 1), 1) for c in cohort]

    def dispatch(self, messages):
        replies, missing = [], 0
        for msg, _ in messages:
            cfg = msg.content["config"]
            if int(cfg["client-id"]) in self.lose.get(str(cfg["secagg-stage"]), ()):
                missing += 1
                continue
            content = secagg_stage(self.rc, cfg, msg.content["arrays"], {}, self.store)
            self.sent_back.append(content)
            replies.append(Message(content, reply_to=msg))
        return replies, missing


def play(rc, tmp_path, cohort, lose=None, rounds=1):
    aggregator = build_aggregator(rc)
    arrays = updates.to_record({k: v.detach().numpy() for k, v in new_model(rc).state_dict().items()})
    population = Population(rc, tmp_path / "state", lose)
    results = []
    for rnd in range(1, rounds + 1):
        aggregator.begin_round(rnd, arrays, FakeGrid())
        _, replies, missing = aggregator.exchange(population, rnd, cohort, arrays, {})
        new, metrics = aggregator.aggregate(rnd, arrays, replies)
        results.append((new, metrics, missing))
        arrays = new if new is not None else arrays
    return aggregator, results, population


def test_a_round_is_released_with_dropouts_at_every_stage_and_leaves_no_secret_behind(tmp_path):
    rc = compose_config(BASE)
    cohort = list(range(12))
    lose = {"advertise": {0}, "share-keys": {1}, "masked-input": {2, 3}, "unmask": {4}}
    aggregator, [(new, metrics, missing)], population = play(rc, tmp_path, cohort, lose)
    assert new is not None and metrics["secagg_released"] == 1.0
    assert metrics["secagg_survivors"] == 12 - 4  # 0, 1, 2, 3 left before or at masking; 4 only before unmasking
    assert missing == 4  # the engine counts as dropped every client of the cohort without a masked input
    dropped_out = [f"secagg-t-round-1-client-{c}" for c in (1, 2, 3, 4)]  # 0 never stored any
    assert population.store.keys() == dropped_out  # the others deleted theirs after unmasking
    assert aggregator.released == 1 and aggregator.dropped == 0
    play(rc, tmp_path, cohort, {"unmask": {5}})  # the next time they take part, their old secrets go
    assert population.store.keys() == ["secagg-t-round-1-client-5"]


def test_too_few_survivors_drop_the_round_and_nothing_is_spent(tmp_path):
    rc = compose_config(BASE)
    aggregator, [(new, metrics, _)], _ = play(rc, tmp_path, list(range(6)), {"masked-input": {0, 1}})
    assert new is None and metrics["secagg_released"] == 0.0
    assert aggregator.released == 0 and aggregator.epsilons() == {"released_model": 0.0, "server": 0.0}


def test_the_decoded_average_moves_the_model_by_the_clipped_updates_plus_the_planned_noise(tmp_path):
    rc = compose_config(BASE + " privacy.clip_norm=0.5")
    aggregator, [(new, _, _)], _ = play(rc, tmp_path, list(range(10)))
    before = {k: v.detach().numpy() for k, v in new_model(rc).state_dict().items()}
    step = np.concatenate([(updates.from_record(new)[k] - v).ravel() for k, v in before.items()])
    plan = aggregator.plan
    # the noise per coordinate of the average is the survivors' Skellam (and rounding) over E[m];
    # the signal (10 clipped updates of norm <= 0.5, over E[m] = 10) is at most 0.5 in norm
    expected_sd = plan.noise_stddev(10) / aggregator.denominator
    assert np.std(step) == pytest.approx(expected_sd, rel=0.15)
    assert np.linalg.norm(step - step.mean()) > 0.5


def test_both_epsilons_match_an_independent_composition(tmp_path):
    rc = compose_config(BASE)
    aggregator, _, _ = play(rc, tmp_path, list(range(8)), rounds=3)
    plan, q = aggregator.plan, 10 / 40
    orders = list(range(2, 65))
    # against the server: Agarwal et al.'s bound, written out here, over 3 rounds, no sampling
    rdp = [3 * (a * plan.l2 ** 2 / (2 * plan.variance) + min(((2 * a - 1) * plan.l2 ** 2 + 6 * plan.l1)
                                                             / (4 * plan.variance ** 2), 3 * plan.l1 / (2 * plan.variance)))
           for a in orders]
    server, _ = rdp_lib.compute_epsilon(orders, rdp, aggregator.delta)
    eps = aggregator.epsilons()
    assert eps["server"] <= server * (1 + 1e-9)  # the ledger's grid has more orders: never worse
    assert eps["server"] == pytest.approx(server, rel=0.02)
    assert eps["released_model"] < eps["server"]
    assert eps["released_model"] == pytest.approx(
        skellam.epsilon([skellam.SkellamRound(plan.l2, plan.l1, plan.variance, q)] * 3, aggregator.delta))
    report = aggregator.privacy_report()
    assert report["epsilon"] == eps["released_model"] and report["epsilon_against_server"] == eps["server"]
    assert report["threat_model"]["colluding_clients"].startswith("up to 0 clients")
    calibrated = skellam.epsilon(plan.rounds(rc.num_rounds, q), aggregator.delta)
    assert 3.9 <= calibrated <= 4.0  # the noise was calibrated for the whole run's 4 rounds


def test_a_plan_that_cannot_work_is_one_line_before_any_work():
    with pytest.raises(ConfigError, match="privacy.distributed.bits.*use more bits"):
        build_aggregator(compose_config(BASE + " privacy.distributed.bits=10"))
    assert math.isfinite(build_aggregator(compose_config(BASE)).plan.variance)


def test_a_whole_run_through_the_engine_and_the_client_app_writes_both_epsilons(tmp_path):
    from conftest import InProcessGrid
    from fedpriv.federation import run_federation

    rc = compose_config(BASE.split() + [f"run_dir={tmp_path}", "num_rounds=3", "tracking.progress=false"])
    summary = run_federation(InProcessGrid(3), rc)  # 3 workers, each a share of the cohort
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["rounds_completed"] == 3
    assert report["rounds_released"] + report["rounds_dropped"] == 3
    assert report["epsilon"] <= report["epsilon_against_server"]
    assert summary["epsilon_against_server"] == report["epsilon_against_server"]
    assert "honest but curious" in report["threat_model"]["server"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("secagg_survivors" not in m and "num_clients" not in m for m in metrics)  # operator-only


@pytest.mark.slow
def test_the_command_line_run_on_ray_prints_both_epsilons_and_keeps_no_secret(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "simulate.py"), *BASE.split(), "num_rounds=3", "num_clients=12",
                          "clients_per_round=12", "sampling=all", "tracking.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=root, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("fedpriv: distributed DP"))
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert f"epsilon {report['epsilon']:.3f} for the released model" in line
    assert f"{report['epsilon_against_server']:.3f} against the server" in line
    assert (report["rounds_released"], report["sampling"]["rate"]) == (3, 1.0)
    state = tmp_path / "run" / "operator_only" / "simulated_client_state"
    assert not list(state.glob("secagg-*"))  # every survivor deleted its round's secrets


def test_a_masked_input_reply_carries_no_raw_figure_of_any_client(tmp_path):
    rc = compose_config(BASE)
    _, [(_, metrics, _)], population = play(rc, tmp_path, list(range(8)))
    assert "train_loss" not in metrics  # the server is not trusted with raw losses
    for content in population.sent_back:
        assert set(content.keys()) <= {"metrics", "config", "arrays"}
        assert set(content["metrics"].keys()) == {"declined", "num-examples"}  # counts only


class Tampering(Population):
    """Client 0's masked input arrives cut short, as a buggy or hostile client could send it."""

    def dispatch(self, messages):
        replies, missing = super().dispatch(messages)
        for reply in replies:
            cfg = reply.content["config"]
            if str(cfg["secagg-stage"]) == "masked-input" and [int(c) for c in cfg["secagg-clients"]] == [0]:
                import torch
                from flwr.app import ArrayRecord

                cut = reply.content["arrays"]["masked-sum"].numpy()[:-1].copy()
                reply.content["arrays"] = ArrayRecord({"masked-sum": torch.from_numpy(cut)})
        return replies, missing


def test_a_malformed_masked_input_counts_as_a_dropout_and_the_round_is_released(tmp_path):
    rc = compose_config(BASE)
    aggregator = build_aggregator(rc)
    arrays = updates.to_record({k: v.detach().numpy() for k, v in new_model(rc).state_dict().items()})
    population = Tampering(rc, tmp_path / "state")
    aggregator.begin_round(1, arrays, FakeGrid())
    aggregator.exchange(population, 1, list(range(8)), arrays, {})
    new, metrics = aggregator.aggregate(1, arrays, [])
    assert new is not None and metrics["secagg_released"] == 1.0 and metrics["secagg_survivors"] == 7
