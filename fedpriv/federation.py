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
from fedpriv.analytics import FederatedAnalytics
from fedpriv.callbacks import (
    Callback,
    CentralEvaluation,
    Checkpointing,
    Disclosure,
    LocalPrivacy,
    Publishing,
    SecretExposure,
)
from fedpriv.config import RunConfig
from fedpriv.engine import Population, RunState, run_rounds
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor
from fedpriv.sampling import ClientSampler
from fedpriv.selection import ModelSelection
from fedpriv.task import dataset_for, encode_config, new_model
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
        # What one reply carries (public by construction: the architecture), against full fine-tuning.
        numbers = sum(int(v.numel()) for v in state.arrays.to_torch_state_dict().values())
        summary.update({"update_numbers": numbers, "update_bytes": 4 * numbers})  # float32 on the wire
        model = new_model(rc)
        if hasattr(model, "full_model_parameters"):  # a language model: adapters travel, the base stays
            summary["full_model_numbers"] = model.full_model_parameters()


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
    sampler = ClientSampler(rc.sampling, rc.num_clients, rc.clients_per_round, sampler_seed(rc), rc.cyclic_groups)
    # Federated analytics (Laplace): its own ledger, joined to the run's total in privacy.json.
    analytics = FederatedAnalytics(rc, dataset_for(rc).num_classes) if rc.analytics.mode != "none" else None
    evaluation = CentralEvaluation(rc)
    # Which round's model ships (selection.method; the config checks that analytics validates): after the
    # analytics, before Disclosure (its privacy.json section) and Checkpointing (the model.pt it swaps in).
    selection = (ModelSelection(rc, analytics, evaluation.evaluate)
                 if rc.selection.method != "last" and analytics is not None else None)
    callbacks: list[Callback] = [
        RunSummary(rc),
        evaluation,
        *([analytics] if analytics is not None else []),  # before Disclosure (its figure) and Checkpointing
        *([selection] if selection is not None else []),
        LocalPrivacy(monitor),
        Disclosure(rc, aggregator, monitor, analytics, selection),
        Checkpointing(rc, {"aggregator": aggregator, "sampler": sampler, "local_monitor": monitor,
                           **({"analytics": analytics} if analytics is not None else {})}),
        *([SecretExposure(rc)] if rc.exposure.secrets else []),  # after Disclosure and Checkpointing
        Publishing(rc, make_trackers(rc, run_dir)),
        *extra_callbacks,
    ]
    client_config: dict[str, Any] = {"task": encode_config(rc), "run-id": state.run_id}
    if rc.client_mode == "virtual":  # the simulated clients' own disks
        client_config["client-state-dir"] = str(run_folder.simulated_client_state_dir(run_dir))
    population = Population(grid, rc, sampler, stop)
    if analytics is not None:  # the label histogram, once, before round 1 (a resumed run holds it already)
        analytics.on_start(state)
        analytics.before_training(population, state.arrays, client_config)
    return run_rounds(state, population, aggregator, callbacks, client_config)
