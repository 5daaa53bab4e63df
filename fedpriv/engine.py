"""The round engine: sample, dispatch, aggregate. Everything else is a callback.

The same engine runs under Flower's simulation engine and its deployment engine; only the
population differs (``client_mode``): virtual clients served by any node, or one client per node.
Evaluation, the local-DP monitor, what may be published, checkpoints and trackers are
:class:`Callback` objects (:mod:`fedpriv.callbacks`), called in the order the app gives them,
the way pfl-research's callbacks work. The engine knows aggregation only through the
:class:`~fedpriv.aggregation.Aggregator` protocol; a budget stop is a :class:`~fedpriv.aggregation.Stop`
value, not an exception.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpriv import updates
from fedpriv.aggregation import Aggregator, Stop
from fedpriv.config import RunConfig
from fedpriv.sampling import ClientSampler

log = logging.getLogger("fedpriv")


@dataclass
class RunState:
    """What a run carries from round to round (and across a resume)."""

    rc: RunConfig
    run_dir: Path
    run_id: str  # names this run's ledgers in the clients' state folders
    arrays: ArrayRecord
    next_round: int = 1
    rounds_done: int = 0
    stop_reason: str = "completed"
    elapsed_before: float = 0.0  # wall seconds of the run before this process resumed it
    started: float = field(default_factory=time.time)
    checkpoint: dict[str, Any] | None = None  # what the run resumes from

    @property
    def wall_seconds(self) -> float:
        return self.elapsed_before + time.time() - self.started


@dataclass
class RoundResult:
    """One finished round: its replies, and the record callbacks fill and publish."""

    server_round: int
    cohort: list[int]
    replies: list[Message]  # successful replies, trained and declined (every one spent privacy)
    aggregated: list[Message]  # those aggregated (not declined, not rejected)
    record: dict[str, Any]
    published: dict[str, Any] = field(default_factory=dict)
    operator: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


class Callback(Protocol):
    """Hooks around the engine's loop; ``after_round`` returns True to stop after that round."""

    def on_start(self, state: RunState) -> None: ...

    def after_round(self, state: RunState, result: RoundResult) -> bool: ...

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------- the population


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


def virtual_client_waves(cohort: list[int], nodes: list[int]) -> list[list[tuple[int, int]]]:
    """(node, client) pairs in waves: client c is served by node ``nodes[c % len(nodes)]`` and no
    node gets two clients in one wave (a Flower node runs one message at a time)."""
    by_node: dict[int, list[int]] = {}
    for c in cohort:
        by_node.setdefault(nodes[c % len(nodes)], []).append(c)
    depth = max((len(cs) for cs in by_node.values()), default=0)
    return [[(n, cs[i]) for n, cs in by_node.items() if i < len(cs)] for i in range(depth)]


class Population:
    """Who the sampled clients are and how a round's messages reach them."""

    def __init__(self, grid: Grid, rc: RunConfig, sampler: ClientSampler):
        self.grid, self.rc, self.sampler = grid, rc, sampler
        if rc.client_mode == "nodes":
            self.nodes = wait_for_nodes(grid, rc.num_clients, rc.round_timeout)
            if len(self.nodes) < rc.num_clients:
                log.warning("only %d of %d client nodes connected; the others count as dropped",
                            len(self.nodes), rc.num_clients)
        else:
            self.nodes = wait_for_nodes(grid, 1, rc.round_timeout)

    def sample_waves(self) -> tuple[list[int], list[list[tuple[int, int]]]]:
        """The round's cohort and its (node, client) waves."""
        if self.rc.client_mode == "nodes":  # one client per node: all in one wave
            self.nodes = sorted(self.grid.get_node_ids()) or self.nodes
            cohort = [int(i) for i in self.sampler.sample() if i < len(self.nodes)]
            return cohort, [[(self.nodes[c], c) for c in cohort]]
        cohort = [int(i) for i in self.sampler.sample()]
        return cohort, virtual_client_waves(cohort, self.nodes)

    def dispatch(self, waves: list[list[tuple[int, int]]], server_round: int, arrays: ArrayRecord,
                 config: dict[str, Any]) -> tuple[list[Message], int]:
        """Send one train message per sampled client; returns the replies and how many never came."""
        replies: list[Message] = []
        sent = 0
        deadline = time.monotonic() + self.rc.round_timeout
        for wave in waves:
            msgs = [
                Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
                            {**config, "client-id": int(c), "server-round": server_round})}),
                        message_type=MessageType.TRAIN, dst_node_id=int(n), group_id=str(server_round))
                for n, c in wave
            ]
            sent += len(msgs)
            replies.extend(self.grid.send_and_receive(msgs, timeout=max(deadline - time.monotonic(), 1.0)))
        return replies, sent - len(replies)


# ------------------------------------------------------------------------------------ the loop


def _aggregatable(aggregator: Aggregator, replies: list[Message], arrays: ArrayRecord, rnd: int) -> tuple[list[Message], int]:
    """Replies that trained and pass the aggregator's validation; how many were rejected."""
    global_np = updates.from_record(arrays)
    valid, rejected = [], 0
    for m in replies:
        if float(m.content["metrics"].get("declined", 0.0)) != 0.0:
            continue
        problem = aggregator.reply_problem(m, global_np)
        if problem is None:
            valid.append(m)
        else:
            rejected += 1
            log.warning("round %d: a client's reply was rejected and counted as failed: %s", rnd, problem)
    return valid, rejected


def run_rounds(state: RunState, population: Population, aggregator: Aggregator, callbacks: list[Callback],
               client_config: dict[str, Any]) -> dict[str, Any]:
    """Run rounds ``state.next_round .. num_rounds``; returns the summary the callbacks filled."""
    for cb in callbacks:
        cb.on_start(state)
    for rnd in range(state.next_round, state.rc.num_rounds + 1):
        started = time.time()
        extra = aggregator.begin_round(rnd, state.arrays, population.grid)
        if isinstance(extra, Stop):
            state.stop_reason = extra.reason
            log.warning("stopping before round %d: %s", rnd, extra.reason)
            break
        cohort, waves = population.sample_waves()
        replies, missing = population.dispatch(waves, rnd, state.arrays, {**client_config, **extra})
        ok = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                log.info("round %d: client failed: %s", rnd, m.error.reason)
        trained, rejected = _aggregatable(aggregator, ok, state.arrays, rnd)
        new_arrays, metrics = aggregator.aggregate(rnd, state.arrays, trained)
        if new_arrays is not None:
            state.arrays = new_arrays
        record = {
            "round": rnd,
            "num_clients": len(trained),
            "num_sampled": len(cohort),
            "num_failed": len(replies) - len(ok) + rejected,
            "num_dropped": missing,
            "clients_declined": sum(1 for m in ok if float(m.content["metrics"].get("declined", 0.0)) != 0.0),
            **metrics,
        }
        result = RoundResult(rnd, cohort, ok, trained, record, started=started)
        stop = False
        for cb in callbacks:
            stop = bool(cb.after_round(state, result)) or stop
        state.rounds_done = rnd
        if stop:
            break
    summary: dict[str, Any] = {
        "rounds_completed": state.rounds_done,
        "rounds_planned": state.rc.num_rounds,
        "stop_reason": state.stop_reason,
    }
    for cb in callbacks:
        cb.on_end(state, summary)
    return summary
