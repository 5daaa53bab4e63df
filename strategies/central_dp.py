"""Central (user-level) differential privacy around any of Flower's aggregation strategies.

The mechanism itself (clip, unweighted sum, Gaussian noise over E[m], adaptive clipping, the
ledger) is :class:`fedpriv.privacy.central.CentralGaussianMechanism`; this module is its Flower
wiring: it turns replies into updates, validates them, and hands the noised average to the
wrapped Flower strategy as a single reply (FedAvg applies it, FedAvgM and FedAdam use it as their
pseudo-gradient), which therefore never sees a raw update.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedpriv import updates
from fedpriv.aggregation import Stop
from fedpriv.audit import CanaryAudit
from fedpriv.config import RunConfig
from fedpriv.privacy import update_noise_for_total
from fedpriv.privacy.central import CentralGaussianMechanism, ClippingState
from fedpriv.privacy.plan import make_noise_plan

__all__ = ["CentralDPAggregator", "ClippingState"]


class CentralDPAggregator:
    """Central DP around a Flower strategy (an :class:`~fedpriv.aggregation.Aggregator`).

    Args (privacy meaning):
        inner: the wrapped aggregator; sees only the noised average, never a raw update.
        mechanism: the Gaussian mechanism, its clipping state and its ledger.
        clip_on: ``server`` or ``client`` (who clips first; the server clips again, the guarantee
            is the same); under client clipping each reply reports its unclipped bit.
    """

    def __init__(self, inner: Any, mechanism: CentralGaussianMechanism, *, clip_on: str = "server"):
        self.inner = inner
        self.mechanism = mechanism
        self.clip_on = clip_on

    @classmethod
    def from_config(cls, rc: RunConfig, inner: Any) -> "CentralDPAggregator":
        plan = make_noise_plan(rc)
        p = rc.privacy
        count_std = p.clipped_count_stddev
        if p.clipping == "adaptive" and count_std is None:
            # Andrew et al. suggest E[m]/20; a small cohort needs more so that the update keeps
            # most of the noise budget (sigma_b >= z gives the update at most 1.155 z).
            count_std = max(plan.denominator / 20.0, max(plan.noise_multipliers))
        clipping = ClippingState(
            norm=p.clip_norm,
            adaptive=p.clipping == "adaptive",
            target_unclipped_quantile=p.target_unclipped_quantile,
            learning_rate=p.clip_lr,
            count_stddev=float(count_std or 0.0),
        )
        if clipping.adaptive:  # fail now, not mid-run, if sigma_b leaves no room for the update noise
            for z in set(plan.noise_multipliers) - {0.0}:
                update_noise_for_total(z, clipping.count_stddev)
        hook = CanaryAudit.from_config(rc, plan) if rc.audit.enabled else None  # audit runs only
        mechanism = CentralGaussianMechanism(plan, clipping, noise_sampler=p.noise_sampler, secure_rng=p.secure_rng,
                                             seed=rc.seed, hook=hook)
        return cls(inner, mechanism, clip_on=p.clip_on)

    @property
    def plan(self):
        """The run's noise plan (the report and the preflight read it)."""
        return self.mechanism.plan

    @property
    def audit(self) -> Any:
        """The canary audit hook, if the run has one (fedpriv.audit.attach_audit reads it)."""
        return self.mechanism.hook

    # -- the round ---------------------------------------------------------------------------
    def noise_multiplier(self, server_round: int) -> float:
        return self.mechanism.noise_multiplier(server_round)

    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Any) -> dict[str, Any] | Stop:
        reason = self.mechanism.stop_reason(server_round)
        if reason is not None:
            return Stop(reason)
        clip_norm = self.mechanism.start_round()
        self.mechanism.prefetch_epsilons(server_round)  # computed while the round trains
        self.inner.begin_round(server_round, arrays, grid)
        return {"clip-norm": clip_norm} if self.clip_on == "client" else {}

    def share_config(self, server_round: int) -> dict[str, Any]:
        """What a worker needs to return its share's clipped sum: the round's clip norm."""
        return {"share": "clipped-sum", "clip-norm": self.mechanism.round_clip_norm}

    def reply_problem(self, reply: Message, global_arrays: dict[str, np.ndarray]) -> str | None:
        """Why a reply must not enter the clipped sum (None if it may): malformed or non-finite
        arrays, or (client clipping) an unclipped bit other than 0 or 1, which would move the
        adaptive clip norm anywhere. Weights are not read: the sum is unweighted. A worker's
        share must hold one bit per client and a sum of norm at most clients x C."""
        try:
            problem = updates.update_problem(updates.from_record(reply.content["arrays"]), global_arrays)
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed reply ({type(exc).__name__}: {exc})"
        if problem is None and _is_share(reply):
            return self._share_problem(reply)
        if problem is None and self.clip_on == "client":
            bit = reply.content["metrics"].get("unclipped") if "metrics" in reply.content else None
            if bit is not None and float(bit) not in (0.0, 1.0):
                problem = f"unclipped bit is {bit}, not 0 or 1"
        return problem

    def _share_problem(self, reply: Message) -> str | None:
        m, diagnostics = reply.content["metrics"], reply.content["diagnostics"]
        n, bits = int(m["clients-trained"]), list(diagnostics["unclipped"])
        if float(m.get("clipped-sum", 0.0)) != 1.0:
            return "a share that is not a clipped sum"
        if len(bits) != n or any(b not in (0.0, 1.0) for b in bits):
            return f"{len(bits)} unclipped bits for {n} clients, or a bit other than 0 or 1"
        norm = updates.l2_norm(updates.from_record(reply.content["arrays"]))
        if norm > n * self.mechanism.round_clip_norm * (1 + 1e-6):
            return f"a clipped sum of norm {norm:.4g} from {n} clients exceeds {n} x clip norm"
        return None

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> tuple[ArrayRecord | None, dict[str, Any]]:
        global_np = updates.from_record(arrays)
        singles = [m for m in replies if not _is_share(m)]
        deltas = [updates.difference(updates.from_record(m.content["arrays"]), global_np) for m in singles]
        reported = None
        if self.clip_on == "client":  # the client says itself whether its update needed clipping
            reported = [m.content["metrics"].get("unclipped") for m in singles]
        total, bits, norms = self.mechanism.clip_and_sum(deltas, global_np, reported)
        losses = [float(m.content["metrics"]["train_loss"]) for m in singles if "train_loss" in m.content["metrics"]]
        for m in replies:
            if _is_share(m):  # a worker's share: its clients' clipped updates, already summed
                total = updates.add(total, {k: np.asarray(v, dtype=np.float64)
                                            for k, v in updates.from_record(m.content["arrays"]).items()})
                bits += [float(b) for b in m.content["diagnostics"]["unclipped"]]
                norms += [float(x) for x in m.content["diagnostics"]["update-norms"]]
                losses += [float(x) for x in m.content["diagnostics"]["train-losses"]]
        release = self.mechanism.release_sum(server_round, total, bits, norms, global_np)

        new_global = {k: (global_np[k].astype(np.float64) + release.noised_mean[k]).astype(global_np[k].dtype)
                      for k in global_np}
        synthetic = Message(
            RecordDict({"arrays": updates.to_record(new_global), "metrics": MetricRecord({"num-examples": 1.0})}),
            dst_node_id=0,
            message_type="train",
        )
        new_arrays, _ = self.inner.aggregate(server_round, arrays, [synthetic])
        self.mechanism.after_update(server_round, release, global_np, new_arrays if new_arrays is not None else new_global)
        metrics = dict(release.metrics)
        metrics["train_loss"] = float(np.mean(losses)) if losses else math.nan  # raw: operator-only
        return new_arrays, metrics

    def covered_metric_keys(self) -> tuple[str, ...]:
        return self.mechanism.covered_metric_keys()

    # -- persistence and reporting ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), **self.mechanism.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.mechanism.load_state_dict(state)

    def privacy_report(self) -> dict[str, Any]:
        return self.mechanism.report(self.clip_on)


def _is_share(reply: Message) -> bool:
    """A worker's reply for several clients (clients.cohort), not one client's model."""
    return "clients-trained" in reply.content["metrics"]
