"""Drive one of Flower's strategies round by round, inside fedpriv's own round loop.

fedpriv samples clients itself (the sampling must match the privacy accountant), so Flower's
``configure_train`` is called only for the state it keeps (FedAdam's and FedAvgM's server
optimiser); its node choice is not used. ``aggregate_train`` is Flower's, unchanged.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv import updates

# Attributes in which Flower's strategies keep state between rounds (server optimisers).
_STATEFUL = ("current_arrays", "m_t", "v_t", "momentum_vector")


class FlowerAggregator:
    """A Flower strategy used for aggregation only."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> dict[str, Any]:
        """Let the strategy see the round's global model; returns extra config for clients."""
        self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        return {}

    def reply_problem(self, reply: Message, global_arrays: dict[str, np.ndarray]) -> str | None:
        """Why a reply must not be aggregated (None if it may): malformed or non-finite arrays,
        or a weight (``num-examples``) that is not a positive finite number."""
        try:
            problem = updates.update_problem(updates.from_record(reply.content["arrays"]), global_arrays)
            weight = float(reply.content["metrics"]["num-examples"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed reply ({type(exc).__name__}: {exc})"
        if problem is None and not (math.isfinite(weight) and weight > 0):
            problem = f"num-examples is {weight}, not a positive finite number"
        return problem

    def share_config(self, server_round: int) -> dict[str, Any]:
        """A worker returns its share's mean model weighted by rows, and their sum as num-examples."""
        return {"share": "weighted-mean"}

    def covered_metric_keys(self) -> tuple[str, ...]:
        """Round metrics covered by a guarantee: none (this aggregator adds no privacy)."""
        return ()

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> tuple[ArrayRecord | None, dict[str, Any]]:
        """Flower's aggregation of successful replies (weighted by ``num-examples``)."""
        if not replies:
            return None, {}
        new_arrays, metrics = self.strategy.aggregate_train(server_round, [_as_one_client(m) for m in replies])
        return new_arrays, dict(metrics or {})

    def state_dict(self) -> dict[str, Any]:
        return {"flower_state": pickle.dumps({k: getattr(self.strategy, k) for k in _STATEFUL if hasattr(self.strategy, k)})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in pickle.loads(state["flower_state"]).items():
            setattr(self.strategy, k, v)

    def privacy_report(self) -> dict[str, Any] | None:
        return None


def _as_one_client(reply: Message) -> Message:
    """A worker's share (its weighted-mean model, its clients' rows as num-examples) in the shape
    Flower's strategies expect of one client's reply; other replies pass unchanged."""
    metrics = reply.content["metrics"]
    if "clients-trained" not in metrics:
        return reply
    losses = list(reply.content["diagnostics"]["train-losses"])
    flat = {"num-examples": float(metrics["num-examples"])}
    if losses:
        flat["train_loss"] = float(np.mean(losses))
    return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": MetricRecord(flat)}),
                   dst_node_id=0, message_type="train")
