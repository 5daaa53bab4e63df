"""A whole federated run: assemble the engine, its aggregation and its callbacks, and run it.

This is the app layer's entry point (both Flower apps and every launcher end up here): it checks
the run folder, builds the aggregation (``strategies``), the sampler, the local-DP monitor and the
callbacks in their contract order (:mod:`fedpriv.callbacks`), and hands them to the round engine
(:mod:`fedpriv.engine`).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedpriv import run_folder
from fedpriv.callbacks import Callback, CentralEvaluation, Checkpointing, Disclosure, LocalPrivacy, Publishing
from fedpriv.config import RunConfig
from fedpriv.engine import Population, RunState, run_rounds
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor
from fedpriv.sampling import ClientSampler
from fedpriv.task import encode_config, new_model
from fedpriv.tracking import make_trackers
from strategies import build_aggregator

__all__ = ["run_federation", "sampler_seed"]


def sampler_seed(rc: RunConfig) -> int | None:
    """Seeded for non-private or explicitly non-secure runs; unpredictable otherwise."""
    if rc.privacy.mode == "none" or not rc.privacy.secure_rng:
        return rc.seed + 7919
    return None


class RunSummary(Callback):
    """The summary's run-level figures (public settings of the configuration, wall time)."""

    def __init__(self, rc: RunConfig):
        self.rc = rc

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        rc = self.rc
        summary.update({
            "wall_seconds": state.wall_seconds, "dataset": rc.dataset.name, "partition": rc.partition.scheme,
            "num_clients": rc.num_clients, "clients_per_round": rc.clients_per_round, "sampling": rc.sampling,
            "strategy": rc.strategy.name, "privacy": rc.privacy.mode,
        })


def run_federation(grid: Grid, rc: RunConfig, extra_callbacks: list[Callback] = (),
                   stop: threading.Event | None = None) -> dict[str, Any]:
    """Run (or resume) a whole federated training; returns the summary it writes.

    ``extra_callbacks`` run after the round is published (tests use them to interrupt a run).
    ``stop``, once set (the launcher's Ctrl-C), ends the run after its last finished round; the
    round in flight is abandoned, nothing released for it (:class:`fedpriv.engine.RoundInterrupted`).
    """
    checkpoint = run_folder.check_run_folder(rc)  # refuses a wrong folder before anything is written
    run_dir = Path(str(rc.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        run_folder.write_config(rc)
    state = RunState(rc, run_dir, run_id=uuid.uuid4().hex, arrays=ArrayRecord(new_model(rc).state_dict()))
    if checkpoint is not None:
        state.checkpoint = checkpoint
        state.arrays = ArrayRecord(checkpoint["arrays"])
        state.next_round = state.rounds_done = int(checkpoint["round"])
        state.next_round += 1
        state.elapsed_before = float(checkpoint["wall_seconds"])
        state.run_id = str(checkpoint.get("run_id") or state.run_id)

    aggregator = build_aggregator(rc)
    monitor = LocalPrivacyMonitor(rc)  # clients' own DP-SGD ledgers (privacy local / central_local)
    sampler = ClientSampler(rc.sampling, rc.num_clients, rc.clients_per_round, sampler_seed(rc))
    callbacks: list[Callback] = [
        RunSummary(rc),
        CentralEvaluation(rc),
        LocalPrivacy(monitor),
        Disclosure(rc, aggregator, monitor),
        Checkpointing(rc, {"aggregator": aggregator, "sampler": sampler, "local_monitor": monitor}),
        Publishing(rc, make_trackers(rc, run_dir)),
        *extra_callbacks,
    ]
    client_config: dict[str, Any] = {"task": encode_config(rc), "run-id": state.run_id}
    if rc.client_mode == "virtual":  # the simulated clients' own disks
        client_config["client-state-dir"] = str(run_folder.simulated_client_state_dir(run_dir))
    return run_rounds(state, Population(grid, rc, sampler, stop), aggregator, callbacks, client_config)
