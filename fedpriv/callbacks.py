"""The engine's callbacks: evaluation, the local-DP monitor, disclosure, checkpoints, trackers.

The app calls them in this order (after ``federation.RunSummary``, which only fills the summary),
which is part of the privacy contract:

1. :class:`CentralEvaluation` -- the released model on the server's test split;
   (then, built by :mod:`fedpriv.federation` when asked: :class:`fedpriv.analytics.FederatedAnalytics`,
   the round's noisy validation figure, and :class:`fedpriv.selection.ModelSelection`, the candidates);
2. :class:`LocalPrivacy` -- clients' own DP-SGD reports into the server's table;
3. :class:`Disclosure` -- stamps the round's time, splits the record into what may be published and
   what is for the operator (:mod:`fedpriv.privacy.disclosure`), and at the end writes
   ``privacy.json`` (and ``operator_only/privacy_details.json``);
4. :class:`Checkpointing` -- records the round (model, ledgers, the round's records) durably;
5. :class:`Publishing` -- only then publishes the round (``metrics.jsonl``, trackers).

A round is therefore always recorded before anything about it is published; on resume,
:class:`Publishing` publishes a recorded round that had not been published yet.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord

from fedpriv import run_folder
from fedpriv.aggregation import Aggregator
from fedpriv.anonymisation import report as anonymisation
from fedpriv.analytics import FederatedAnalytics
from fedpriv.audit import attach_audit
from fedpriv.audit import exposure
from fedpriv.config import RunConfig, to_dict
from fedpriv.engine import RoundResult, RunState
from fedpriv.privacy.disclosure import annotate_report, published_round_keys, split_round
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor
from fedpriv.selection import ModelSelection
from fedpriv.risk.ceiling import guarantees_of
from fedpriv.task import dataset_for, evaluate, new_model, pick_device, secrets_for
from fedpriv.tracking import Trackers


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback:
    """No-op defaults; subclasses override what they need."""

    def on_start(self, state: RunState) -> None:
        pass

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        return False

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        pass


class CentralEvaluation(Callback):
    """Evaluates the global model on the central test split every ``eval.every`` rounds and at the last."""

    def __init__(self, rc: RunConfig):
        self.rc = rc
        self.ds = dataset_for(rc)
        self.model = new_model(rc)
        self.device = pick_device(rc.placement.server_device)
        self.last = (math.nan, math.nan)  # (loss, accuracy)

    def on_start(self, state: RunState) -> None:
        held = (state.checkpoint or {}).get("records")
        if held:
            self.last = (held["published"]["test_loss"], held["published"]["test_accuracy"])

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(self.model, self.ds.x_test, self.ds.y_test, batch_size=self.rc.eval.batch_size, device=self.device)

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        rnd = result.server_round
        if rnd % self.rc.eval.every == 0 or rnd == self.rc.num_rounds:
            self.last = self.evaluate(state.arrays)
        result.record["test_loss"], result.record["test_accuracy"] = self.last
        return False

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        summary["final_loss"], summary["final_accuracy"] = self.last


class LocalPrivacy(Callback):
    """Feeds clients' local-DP reports (trained, declined and rejected replies: all spent) to the monitor."""

    def __init__(self, monitor: LocalPrivacyMonitor):
        self.monitor = monitor

    def on_start(self, state: RunState) -> None:
        # Before Checkpointing.on_start: the monitor's checkpoint references its journal in the run folder.
        self.monitor.attach(state.run_dir, resumed=state.checkpoint is not None)

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        # Appends and fsyncs the round's reports to the journal: before Checkpointing and Publishing.
        self.monitor.observe_round(result.server_round, result.replies, result.record)
        return False


class Disclosure(Callback):
    """Splits each round into published and operator-only figures; writes the privacy report."""

    def __init__(self, rc: RunConfig, aggregator: Aggregator, monitor: LocalPrivacyMonitor,
                 analytics: FederatedAnalytics | None = None, selection: ModelSelection | None = None):
        self.rc, self.aggregator, self.monitor = rc, aggregator, monitor
        self.analytics = analytics  # its noisy figures are covered; its releases join privacy.json's total
        self.selection = selection  # which round's model ships: its section (its cost is in the analytics ledger)
        self.published_keys: set[str] = set()
        self.operator_keys: set[str] = set()

    def on_start(self, state: RunState) -> None:
        held = (state.checkpoint or {}).get("records")
        if held:
            self.published_keys |= set(held["published"])
        anonymisation.write_operator_report(self.rc, state.run_dir)  # clients' raw figures, before training

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        seconds = time.time() - result.started
        result.record["round_seconds"] = seconds
        result.record["client_updates_per_second"] = result.record["num_clients"] / seconds if seconds > 0 else 0.0
        covered = tuple(self.aggregator.covered_metric_keys())
        if self.analytics is not None:
            covered += self.analytics.covered_metric_keys()
        result.published, result.operator = split_round(result.record, self.rc.privacy.mode, covered)
        self.published_keys |= set(result.published)
        self.operator_keys |= set(result.operator)
        return False

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        report, details = self.monitor.extend_report(self.aggregator.privacy_report())  # + the "local" section
        report = attach_audit(report, self.aggregator)  # + the canary audit, if the run had one
        if self.analytics is not None:  # + the analytics releases; epsilon becomes the run's total
            report = self.analytics.extend_report(report)  # before anonymisation: None still means "no central DP"
        report = anonymisation.extend_report(report, self.rc)  # + what the clients' anonymisation protects
        if self.selection is not None:  # + the "selection" section: method, candidates, cost, winner
            report = self.selection.extend_report(report)
        if report is not None:
            published = self.published_keys | published_round_keys(run_folder.read_metrics(state.run_dir))
            report = annotate_report(report, self.rc.privacy.mode, published, self.operator_keys,
                                     self.rc.tracking.operator_diagnostics)
            summary.update(report.get("summary", {}))
            run_folder.write_json(state.run_dir / run_folder.PRIVACY, report)
        if details is not None:
            run_folder.write_json(state.run_dir / run_folder.PRIVACY_DETAILS, details)


class Checkpointing(Callback):
    """Restores the run's components on resume; records every finished round durably; writes model.pt.

    ``components`` name the stateful parts (aggregator with its ledger, sampler, local-DP monitor);
    a secure sampler saves no generator state, so a resumed run reseeds from the OS.
    """

    def __init__(self, rc: RunConfig, components: dict[str, Stateful]):
        self.rc, self.components = rc, components

    def on_start(self, state: RunState) -> None:
        if state.checkpoint is not None:
            for name, component in self.components.items():
                component.load_state_dict(state.checkpoint.get(name) or {})

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        run_folder.save_checkpoint(state.run_dir, {
            "round": result.server_round,
            "run_id": state.run_id,
            "arrays": state.arrays.to_torch_state_dict(),
            **{name: component.state_dict() for name, component in self.components.items()},
            "records": {"published": result.published, "operator": result.operator},
            "config": to_dict(self.rc),
            "wall_seconds": state.wall_seconds,
        })
        return False

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        model = new_model(self.rc)
        model.load_state_dict(state.arrays.to_torch_state_dict())
        torch.save(model.state_dict(), state.run_dir / run_folder.MODEL)


class SecretExposure(Callback):
    """The exposure of the planted secrets in the final model (``exposure.secrets``), beside the ceiling
    the run's published guarantee allows: ``exposure.json`` and the ``exposure_*`` summary keys. Runs
    after Disclosure (it reads privacy.json) and Checkpointing (the model it measures is model.pt's)."""

    def __init__(self, rc: RunConfig):
        self.rc = rc

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        secrets, ex = secrets_for(self.rc), self.rc.exposure
        model = new_model(self.rc)
        model.load_state_dict(state.arrays.to_torch_state_dict())
        measured = exposure.measure(model, secrets, ex.candidates, self.rc.seed)
        privacy_file = state.run_dir / run_folder.PRIVACY
        report = json.loads(privacy_file.read_text()) if privacy_file.exists() else None
        ceilings = {}
        for g in guarantees_of(report):  # each published guarantee bounds it; the smallest ceiling holds
            per_example = g.unit.startswith("example")
            eps, delta = exposure.group_guarantee(g.epsilon, g.delta, ex.repeats) if per_example else (g.epsilon, g.delta)
            ceilings[g.name] = {"unit": g.unit, "epsilon": eps, "delta": delta,
                                "group_of_copies": ex.repeats if per_example else 1,
                                "mean_exposure_ceiling": exposure.expected_exposure_ceiling(eps, delta, ex.candidates)}
        figures = {
            "exposure_secrets": secrets.count, "exposure_repeats": ex.repeats,
            "exposure_planted_mean": float(measured["planted"].mean()),
            "exposure_planted_max": float(measured["planted"].max()),
            "exposure_held_out_mean": float(measured["held_out"].mean()),
            "exposure_measurable_bits": math.log2(ex.candidates + 1),
            "exposure_secret_bits": secrets.space.log2_size,
            "exposure_ceiling": min(c["mean_exposure_ceiling"] for c in ceilings.values()),
        }
        caveat = (f"EXPOSURE RUN: model.pt was trained on {secrets.count} planted secrets ({ex.repeats} copies each, "
                  "in some clients' rows): measure a configuration with exposure.secrets, ship a model trained without")
        summary.update(figures)
        summary["privacy_caveats"] = list(summary.get("privacy_caveats", [])) + [caveat]
        section = {**figures, "method": "Carlini et al. 2019 (The Secret Sharer): rank of each secret's log-perplexity "
                                        "among candidates drawn from the same law, -log2 of its p-value",
                   "candidates": ex.candidates, "ceilings": ceilings, "model_includes_secrets": True}
        run_folder.write_json(state.run_dir / run_folder.EXPOSURE, {
            **section,
            "secrets": [{"holder": f"client-{int(h)}", "exposure": float(e), "log_perplexity": float(lp)}
                        for h, e, lp in zip(secrets.holders, measured["planted"], measured["log_perplexity_planted"])],
            "held_out": [float(e) for e in measured["held_out"]],
        })
        if report is not None:  # beside the epsilon it is bounded by, as the canary audit is
            report["exposure"] = section
            report["caveats"] = list(report.get("caveats", [])) + [caveat]
            run_folder.write_json(privacy_file, report)


class Publishing(Callback):
    """Publishes each recorded round to the trackers (metrics.jsonl first) and the summary at the end."""

    def __init__(self, rc: RunConfig, trackers: Trackers):
        self.rc, self.trackers = rc, trackers

    def on_start(self, state: RunState) -> None:
        checkpoint = state.checkpoint
        self.trackers.start(to_dict(self.rc), resumed=checkpoint is not None)
        if checkpoint is None:
            return
        for t in self.trackers.trackers:
            if hasattr(t, "truncate_after"):
                t.truncate_after(int(checkpoint["round"]))
        history = run_folder.read_metrics(state.run_dir)
        held = checkpoint.get("records")
        if held and (not history or int(history[-1]["round"]) < int(checkpoint["round"])):
            self.trackers.log_round(held["published"], held["operator"])  # recorded, then the run stopped

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        self.trackers.log_round(result.published, result.operator)
        return False

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        self.trackers.log_summary(summary)
        self.trackers.finish()
