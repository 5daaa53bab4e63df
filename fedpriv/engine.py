"""The round engine: sample, dispatch, aggregate. Everything else is a callback.

The same engine runs under Flower's simulation engine and its deployment engine; only the
population differs (``client_mode``): virtual clients served by any node, or one client per node.
Evaluation, the local-DP monitor, what may be published, checkpoints and trackers are
:class:`Callback` objects (:mod:`fedpriv.callbacks`), called in the order the app gives them,
the way pfl-research's callbacks work. The engine knows aggregation only through the
:class:`~fedpriv.aggregation.Aggregator` protocol; a budget stop is a :class:`~fedpriv.aggregation.Stop`
value, not an exception.

A run can be asked to stop (``stop``, an event the launcher sets on Ctrl-C): the round in flight is
abandoned, never aggregated nor recorded (no noise-only round), and the run ends after its last
finished round with ``stop_reason`` "interrupted".
"""

from __future__ import annotations

import logging
import threading
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


#: Seconds between pulls of replies in simulation. Flower's InMemoryGrid pulls every 0.1 s, and a
#: round then ends on a 0.1 s step after its last reply (benchmark_engine.py's round times came in
#: 0.1 s steps); a pull there is an in-process lookup, cheap enough to do 100 times a second.
SIMULATION_PULL_INTERVAL = 0.01


class RoundInterrupted(Exception):
    """The run was asked to stop while a round's replies were awaited: the round is abandoned."""


class Callback(Protocol):
    """Hooks around the engine's loop; ``after_round`` returns True to stop after that round."""

    def on_start(self, state: RunState) -> None: ...

    def after_round(self, state: RunState, result: RoundResult) -> bool: ...

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------- the population


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, stop: threading.Event | None = None) -> list[int]:
    """Node ids once at least ``minimum`` are connected (or whatever is there after ``timeout``)."""
    deadline, stop = time.monotonic() + timeout, stop or threading.Event()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            if not nodes:
                raise RuntimeError(f"no Flower node connected within {timeout:.0f} s")
            return nodes
        if stop.wait(0.5):
            raise RoundInterrupted("stopped while waiting for Flower nodes")


class Population:
    """Who the sampled clients are and how a round's messages reach them."""

    def __init__(self, grid: Grid, rc: RunConfig, sampler: ClientSampler, stop: threading.Event | None = None):
        """``stop``: set by the launcher to end the run (Ctrl-C); a round whose replies are awaited
        when it is set is abandoned (:class:`RoundInterrupted`), so nothing is released for it."""
        self.grid, self.rc, self.sampler = grid, rc, sampler
        self.stop = stop if stop is not None else threading.Event()
        if rc.client_mode == "nodes":
            self.nodes = wait_for_nodes(grid, rc.num_clients, rc.round_timeout, self.stop)
            if len(self.nodes) < rc.num_clients:
                log.warning("only %d of %d client nodes connected; the others count as dropped",
                            len(self.nodes), rc.num_clients)
        else:
            self.nodes = wait_for_nodes(grid, 1, rc.round_timeout, self.stop)

    @property
    def uses_shares(self) -> bool:
        """Simulation sends each worker one message with its share of the cohort; deployment one
        message per client (a SuperNode is one client)."""
        return self.rc.client_mode == "virtual"

    def sample(self, server_round: int) -> list[int]:
        if self.rc.client_mode == "nodes":
            self.nodes = sorted(self.grid.get_node_ids()) or self.nodes
            return [int(i) for i in self.sampler.sample(server_round) if i < len(self.nodes)]
        return [int(i) for i in self.sampler.sample(server_round)]

    def messages(self, cohort: list[int], server_round: int, arrays: ArrayRecord,
                 config: dict[str, Any]) -> list[tuple[Message, int]]:
        """(message, number of clients it carries): one per client, or one share per worker."""
        def message(node: int, extra: dict[str, Any]) -> Message:
            return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
                               {**config, "server-round": server_round, **extra})}),
                           message_type=MessageType.TRAIN, dst_node_id=int(node), group_id=str(server_round))

        if not self.uses_shares:
            return [(message(self.nodes[c], {"client-id": int(c)}), 1) for c in cohort]
        k = min(len(self.nodes), len(cohort))
        shares = [cohort[i::k] for i in range(k)]  # balanced; any worker can serve any client
        return [(message(self.nodes[i], {"client-ids": [int(c) for c in share]}), len(share))
                for i, share in enumerate(shares)]

    def dispatch(self, messages: list[tuple[Message, int]]) -> tuple[list[Message], int]:
        """Send the round's messages; returns the replies and how many clients' replies never came
        within ``round_timeout``. Raises :class:`RoundInterrupted` if ``stop`` is set meanwhile.

        Grid.send_and_receive's loop, with the stop checked between pulls (every
        SIMULATION_PULL_INTERVAL in simulation; at the grid's own interval against a SuperLink)."""
        sizes = {int(m.metadata.dst_node_id): n for m, n in messages}
        pending = set(self.grid.push_messages([m for m, _ in messages]))
        deadline = time.monotonic() + self.rc.round_timeout
        interval = float(getattr(self.grid, "pull_interval", 3.0))
        if type(self.grid).__name__ == "InMemoryGrid":  # simulation: a pull is a lookup in this process,
            interval = min(interval, SIMULATION_PULL_INTERVAL)  # so poll finer than Flower's 0.1 s quantum
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got}
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            if self.stop.wait(min(interval, left)):
                raise RoundInterrupted("stopped while the round's replies were awaited")
        answered = {int(r.metadata.src_node_id) for r in replies}
        return replies, sum(n for node, n in sizes.items() if node not in answered)


def reply_counts(reply: Message, share_size: int, shares: bool) -> dict[str, int] | None:
    """How many clients a reply accounts for: trained (in its arrays), declined, failed, rejected;
    None for a malformed reply (missing records, wrong types, counts that do not add up to the
    clients it was sent for, or a share where one client was asked)."""
    if reply.has_error():
        return {"trained": 0, "declined": 0, "failed": share_size, "rejected": 0}
    try:
        m = reply.content["metrics"]
        if "clients-trained" in m:  # a worker's share
            if not shares:
                return None
            counts = {"trained": int(m["clients-trained"]), "declined": int(m["clients-declined"]),
                      "failed": int(m["clients-failed"]), "rejected": int(m["clients-rejected"])}
            ok = min(counts.values()) >= 0 and sum(counts.values()) == share_size
            return counts if ok else None
        declined = int(float(m.get("declined", 0.0)) != 0.0)
    except (KeyError, TypeError, ValueError):
        return None
    return {"trained": 1 - declined, "declined": declined, "failed": 0, "rejected": 0}


# ------------------------------------------------------------------------------------ the loop


def _aggregatable(aggregator: Aggregator, replies: list[tuple[Message, dict[str, int]]], arrays: ArrayRecord,
                  rnd: int) -> tuple[list[Message], int]:
    """Replies that hold trained clients and pass the aggregator's validation; how many clients
    the rejected ones held (counted as failed)."""
    global_np = updates.from_record(arrays)
    valid, rejected = [], 0
    for m, counts in replies:
        trained = counts["trained"]
        if trained == 0:
            continue
        try:
            problem = aggregator.reply_problem(m, global_np)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"malformed reply ({type(exc).__name__}: {exc})"
        if problem is None:
            valid.append(m)
        else:
            rejected += trained
            log.warning("round %d: a reply (%d client(s)) was rejected and counted as failed: %s", rnd, trained, problem)
    return valid, rejected


def run_rounds(state: RunState, population: Population, aggregator: Aggregator, callbacks: list[Callback],
               client_config: dict[str, Any]) -> dict[str, Any]:
    """Run rounds ``state.next_round .. num_rounds``; returns the summary the callbacks filled."""
    for cb in callbacks:
        cb.on_start(state)
    for rnd in range(state.next_round, state.rc.num_rounds + 1):
        if population.stop.is_set():
            state.stop_reason = "interrupted"
            break
        started = time.time()
        extra = aggregator.begin_round(rnd, state.arrays, population.grid)
        if isinstance(extra, Stop):
            state.stop_reason = extra.reason
            log.warning("stopping before round %d: %s", rnd, extra.reason)
            break
        if population.uses_shares:
            extra = aggregator.share_config(rnd)
        cohort = population.sample(rnd)
        exchange = getattr(aggregator, "exchange", None)  # a multi-stage round (secure aggregation)
        dispatched = time.time()
        try:
            if exchange is None:
                messages = population.messages(cohort, rnd, state.arrays, {**client_config, **extra})
                replies, missing = population.dispatch(messages)
            else:
                messages, replies, missing = exchange(population, rnd, cohort, state.arrays, {**client_config, **extra})
        except RoundInterrupted:
            state.stop_reason = "interrupted"
            log.warning("round %d interrupted: abandoned, not aggregated nor recorded", rnd)
            break
        replied = time.time()
        for m in replies:
            if m.has_error():
                log.info("round %d: client(s) failed: %s", rnd, m.error.reason)
        sizes = {int(m.metadata.dst_node_id): n for m, n in messages}
        counts, ok = [], []
        for m in replies:
            size = sizes.get(int(m.metadata.src_node_id), 1)
            c = reply_counts(m, size, population.uses_shares)
            if c is None:
                log.warning("round %d: a malformed reply (%d client(s)) was counted as failed", rnd, size)
                c = {"trained": 0, "declined": 0, "failed": size, "rejected": 0}
            elif not m.has_error():
                ok.append((m, c))
            counts.append(c)
        trained, rejected = _aggregatable(aggregator, ok, state.arrays, rnd)
        new_arrays, metrics = aggregator.aggregate(rnd, state.arrays, trained)
        if new_arrays is not None:
            state.arrays = new_arrays
        record = {
            "round": rnd,
            "num_clients": sum(c["trained"] for c in counts) - rejected,
            "num_sampled": len(cohort),
            "num_failed": sum(c["failed"] + c["rejected"] for c in counts) + rejected,
            "num_dropped": missing,
            "clients_declined": sum(c["declined"] for c in counts),
            **metrics,
            # where the round's time went (operator-only diagnostics): messages out until the last reply, then the server
            "dispatch_seconds": replied - dispatched,
            "server_seconds": time.time() - replied,
        }
        result = RoundResult(rnd, cohort, [m for m, _ in ok], trained, record, started=started)
        stop = False
        for cb in callbacks:
            stop = bool(cb.after_round(state, result)) or stop
        state.rounds_done = rnd
        if population.stop.is_set() and rnd < state.rc.num_rounds:
            state.stop_reason = "interrupted"
            break
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
