"""The server's round loop: sample, dispatch, aggregate, evaluate, log, checkpoint.

The same loop runs under Flower's simulation engine and its deployment engine; only the
population differs (``client_mode``): virtual clients served by any node, or one client per node.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpriv.audit import attach_audit
from fedpriv import run_folder, updates
from fedpriv.config import RunConfig, to_dict
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor
from fedpriv.privacy.disclosure import annotate_report, published_round_keys, split_round
from fedpriv.run_folder import check_run_folder
from fedpriv.sampling import ClientSampler
from fedpriv.task import evaluate, dataset_for, encode_config, new_model, pick_device
from fedpriv.tracking import make_trackers
from strategies import build_aggregator

log = logging.getLogger("fedpriv")


class StopRun(Exception):
    """Raised by a strategy before a round that must not happen (e.g. the privacy budget)."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Node ids once at least ``minimum`` are connected (or whatever is there after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            if not nodes:
                raise RuntimeError(f"no Flower node connected within {timeout:.0f} s")
            return nodes
        time.sleep(0.5)


def sampler_seed(rc: RunConfig) -> int | None:
    """Seeded for non-private or explicitly non-secure runs; unpredictable otherwise."""
    if rc.privacy.mode == "none" or not rc.privacy.secure_rng:
        return rc.seed + 7919
    return None


def _train_message(node_id: int, client_id: int, server_round: int, arrays: ArrayRecord, task: str, extra: dict[str, Any]) -> Message:
    config = ConfigRecord({"task": task, "client-id": int(client_id), "server-round": server_round, **extra})
    return Message(
        content=RecordDict({"arrays": arrays, "config": config}),
        message_type=MessageType.TRAIN,
        dst_node_id=int(node_id),
        group_id=str(server_round),
    )


def virtual_client_waves(cohort: list[int], nodes: list[int]) -> list[list[tuple[int, int]]]:
    """(node, client) pairs in waves: client c is always served by node ``nodes[c % len(nodes)]``
    (its ``context.state``, where a DP-SGD client keeps its ledger, lives on that node), and no
    node gets two clients in one wave (Flower keeps one context per node)."""
    by_node: dict[int, list[int]] = {}
    for c in cohort:
        by_node.setdefault(nodes[c % len(nodes)], []).append(c)
    depth = max((len(cs) for cs in by_node.values()), default=0)
    return [[(n, cs[i]) for n, cs in by_node.items() if i < len(cs)] for i in range(depth)]


def dispatch_round(
    grid: Grid,
    cohort: list[int],
    node_for: dict[int, int] | None,
    nodes: list[int],
    server_round: int,
    arrays: ArrayRecord,
    task: str,
    extra: dict[str, Any],
    timeout: float,
) -> tuple[list[Message], int]:
    """Send one train message per sampled client; returns the replies and how many never came.

    With virtual clients, a node serves one client at a time (Flower keeps one context per
    node), so a cohort larger than the node count goes out in waves.
    """
    replies: list[Message] = []
    sent = 0
    if node_for is not None:  # one client per node (deployment)
        waves = [[(node_for[c], c) for c in cohort]]
    else:
        waves = virtual_client_waves(cohort, nodes)
    deadline = time.monotonic() + timeout
    for wave in waves:
        remaining = max(deadline - time.monotonic(), 1.0)
        msgs = [_train_message(n, c, server_round, arrays, task, extra) for n, c in wave]
        sent += len(msgs)
        replies.extend(grid.send_and_receive(msgs, timeout=remaining))
    return replies, sent - len(replies)


class CentralEvaluator:
    """Evaluates the global model on the held-out central test split."""

    def __init__(self, rc: RunConfig):
        self.ds = dataset_for(rc)
        self.model = new_model(rc)
        self.device = pick_device(rc.placement.server_device)
        self.batch_size = rc.eval.batch_size

    def __call__(self, arrays: ArrayRecord) -> tuple[float, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(self.model, self.ds.x_test, self.ds.y_test, batch_size=self.batch_size, device=self.device)


def _resume_state(checkpoint: dict[str, Any], aggregator: Any, sampler: ClientSampler,
                  local_monitor: LocalPrivacyMonitor) -> None:
    aggregator.load_state_dict(checkpoint["aggregator"])
    sampler.load_state_dict(checkpoint["sampler"])  # a secure sampler saved nothing: it stays OS-seeded
    local_monitor.load_state_dict(checkpoint.get("local_monitor") or {})


def _valid_replies(aggregator: Any, replies: list[Message], global_np: dict[str, Any], rnd: int) -> tuple[list[Message], int]:
    """The replies that may be aggregated, and how many were rejected (counted as failed)."""
    valid, rejected = [], 0
    for m in replies:
        problem = aggregator.reply_problem(m, global_np)
        if problem is None:
            valid.append(m)
        else:
            rejected += 1
            log.warning("round %d: a client's reply was rejected and counted as failed: %s", rnd, problem)
    return valid, rejected


def run_federation(grid: Grid, rc: RunConfig) -> dict[str, Any]:
    """Run (or resume) a whole federated training; returns the summary it writes.

    Every round is recorded (checkpoint with the privacy ledgers, written durably) before
    anything about it is published (metrics, trackers), so no published release is ever
    missing from the ledger, and a resumed run never releases a recorded round again.
    """
    checkpoint = check_run_folder(rc)  # refuses a wrong folder before anything is written
    run_dir = Path(str(rc.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.time()

    model = new_model(rc)
    arrays = ArrayRecord(model.state_dict())
    aggregator = build_aggregator(rc)
    local_monitor = LocalPrivacyMonitor(rc)  # clients' own DP-SGD ledgers (privacy local / central_local)
    evaluator = CentralEvaluator(rc)
    task = encode_config(rc)

    if rc.client_mode == "nodes":
        nodes = wait_for_nodes(grid, rc.num_clients, rc.round_timeout)
        if len(nodes) < rc.num_clients:
            log.warning("only %d of %d client nodes connected; the others count as dropped", len(nodes), rc.num_clients)
    else:
        nodes = wait_for_nodes(grid, 1, rc.round_timeout)
    sampler = ClientSampler(rc.sampling, rc.num_clients, rc.clients_per_round, sampler_seed(rc))

    start_round, elapsed_before = 1, 0.0
    run_id = uuid.uuid4().hex  # names this run's ledgers in the clients' state folders
    if checkpoint is not None:
        arrays = ArrayRecord(checkpoint["arrays"])
        _resume_state(checkpoint, aggregator, sampler, local_monitor)
        start_round = int(checkpoint["round"]) + 1
        elapsed_before = float(checkpoint["wall_seconds"])
        run_id = str(checkpoint.get("run_id") or run_id)
        log.info("resuming %s after round %d", run_dir, checkpoint["round"])
    base_extra: dict[str, Any] = {"run-id": run_id}
    if rc.client_mode == "virtual":  # the simulated clients' own disks
        base_extra["client-state-dir"] = str(run_folder.simulated_client_state_dir(run_dir))

    trackers = make_trackers(rc, run_dir)
    trackers.start(to_dict(rc), resumed=checkpoint is not None)
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        for t in trackers.trackers:
            if hasattr(t, "truncate_after"):
                t.truncate_after(start_round - 1)
        history = run_folder.read_metrics(run_dir)
        held = checkpoint.get("records")
        if held and (not history or int(history[-1]["round"]) < int(checkpoint["round"])):
            trackers.log_round(held["published"], held["operator"])  # recorded, then the run stopped
            history.append(held["published"])

    stop_reason = "completed"
    last_eval = (history[-1]["test_loss"], history[-1]["test_accuracy"]) if history else (math.nan, math.nan)
    rounds_done = start_round - 1
    operator_keys: set[str] = set()
    for rnd in range(start_round, rc.num_rounds + 1):
        t0 = time.time()
        try:
            extra = aggregator.begin_round(rnd, arrays, grid)
        except StopRun as exc:
            stop_reason = str(exc)
            log.warning("stopping before round %d: %s", rnd, exc)
            break
        if rc.client_mode == "nodes":
            nodes = sorted(grid.get_node_ids()) or nodes
            ids = sampler.sample()
            cohort = [int(i) for i in ids if i < len(nodes)]
            node_for = {c: nodes[c] for c in cohort}
        else:
            cohort = [int(i) for i in sampler.sample()]
            node_for = None
        replies, missing = dispatch_round(grid, cohort, node_for, nodes, rnd, arrays, task, {**base_extra, **extra},
                                          rc.round_timeout)
        ok = [m for m in replies if not m.has_error()]
        failed = [m for m in replies if m.has_error()]
        for m in failed:
            log.info("round %d: client failed: %s", rnd, m.error.reason)
        willing = [m for m in ok if float(m.content["metrics"].get("declined", 0.0)) == 0.0]
        declined = len(ok) - len(willing)
        trained, rejected = _valid_replies(aggregator, willing, updates.from_record(arrays), rnd)

        new_arrays, agg_metrics = aggregator.aggregate(rnd, arrays, trained)
        if new_arrays is not None:
            arrays = new_arrays
        if rnd % rc.eval.every == 0 or rnd == rc.num_rounds:
            last_eval = evaluator(arrays)
        round_seconds = time.time() - t0
        record: dict[str, Any] = {
            "round": rnd,
            "test_accuracy": last_eval[1],
            "test_loss": last_eval[0],
            "num_clients": len(trained),
            "num_sampled": len(cohort),
            "num_failed": len(failed) + rejected,
            "num_dropped": missing,
            "clients_declined": declined,
            "round_seconds": round_seconds,
            "client_updates_per_second": len(trained) / round_seconds if round_seconds > 0 else 0.0,
        }
        record.update(agg_metrics)
        local_monitor.observe_round(rnd, ok, record)  # trained, declined and rejected replies: all spent
        published, operator = split_round(record, rc.privacy.mode, aggregator.covered_metric_keys())
        operator_keys |= set(operator)
        rounds_done = rnd
        run_folder.save_checkpoint(
            run_dir,
            {
                "round": rnd,
                "run_id": run_id,
                "arrays": arrays.to_torch_state_dict(),
                "aggregator": aggregator.state_dict(),
                "sampler": sampler.state_dict(),
                "local_monitor": local_monitor.state_dict(),
                "records": {"published": published, "operator": operator},
                "config": to_dict(rc),
                "wall_seconds": elapsed_before + time.time() - wall_start,
            },
        )
        trackers.log_round(published, operator)  # only now: the round is recorded
        history.append(published)
        if os.environ.get("FEDPRIV_TEST_CRASH_AFTER_ROUND") == str(rnd):  # test-only: an interrupted run
            raise RuntimeError(f"simulated crash after round {rnd}")

    final_model = new_model(rc)
    final_model.load_state_dict(arrays.to_torch_state_dict())
    torch.save(final_model.state_dict(), run_dir / run_folder.MODEL)
    summary: dict[str, Any] = {
        "final_accuracy": last_eval[1],
        "final_loss": last_eval[0],
        "rounds_completed": rounds_done,
        "rounds_planned": rc.num_rounds,
        "stop_reason": stop_reason,
        "wall_seconds": elapsed_before + time.time() - wall_start,
        "dataset": rc.dataset.name,
        "partition": rc.partition.scheme,
        "num_clients": rc.num_clients,
        "clients_per_round": rc.clients_per_round,
        "sampling": rc.sampling,
        "strategy": rc.strategy.name,
        "privacy": rc.privacy.mode,
    }
    report, details = local_monitor.extend_report(aggregator.privacy_report())  # + the "local" section
    report = attach_audit(report, aggregator)  # + the canary audit section, audit_* and privacy_bug keys
    if report is not None:
        published_keys = published_round_keys(history)
        report = annotate_report(report, rc.privacy.mode, published_keys, operator_keys, rc.tracking.operator_diagnostics)
        summary.update(report.get("summary", {}))
        run_folder.write_json(run_dir / run_folder.PRIVACY, report)
    if details is not None:
        run_folder.write_json(run_dir / run_folder.PRIVACY_DETAILS, details)
    trackers.log_summary(summary)
    trackers.finish()
    return summary
