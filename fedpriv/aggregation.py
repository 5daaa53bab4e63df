"""What the round engine asks of server-side aggregation (a Protocol), and the stop signal.

``strategies/`` implements :class:`Aggregator` (plain Flower strategies, and central DP around
them); the engine in :mod:`fedpriv.engine` depends only on this declaration, so the core never
imports the layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from flwr.app import ArrayRecord, Message

from fedpriv.updates import Arrays


@dataclass(frozen=True)
class Stop:
    """A round that must not happen (e.g. the privacy budget): the run ends cleanly before it."""

    reason: str


class Aggregator(Protocol):
    """Server-side aggregation, round by round, inside fedpriv's engine.

    An aggregator whose round is more than one exchange (secure aggregation) also has
    ``exchange(population, server_round, cohort, arrays, config) -> (messages, replies, missing)``:
    it talks to the cohort itself and returns the exchange whose replies the engine counts."""

    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Any) -> dict[str, Any] | Stop:
        """Extra config for this round's clients (e.g. the clip norm), or :class:`Stop`."""

    def share_config(self, server_round: int) -> dict[str, Any]:
        """How a worker combines its share of the cohort into one reply (clients.cohort)."""

    def reply_problem(self, reply: Message, global_arrays: Arrays) -> str | None:
        """Why a reply must not be aggregated (it then counts as failed), or None."""

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> tuple[ArrayRecord | None, dict[str, Any]]:
        """The new global model (None: unchanged) and the round's metrics."""

    def covered_metric_keys(self) -> tuple[str, ...]:
        """Which of the round's metrics a privacy guarantee covers (may be published)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def privacy_report(self) -> dict[str, Any] | None:
        """privacy.json's content for this aggregation (None without central DP)."""
