"""Launch a run on Flower's simulation engine (Ray), with placement mapped to Ray resources, and
see it through the faults a long simulation meets.

* A worker (a Ray actor serving a Flower node) that dies, e.g. killed for memory, costs only the
  clients it was training that round (counted failed); Ray starts a replacement (``max_restarts``)
  and later rounds run normally. Any worker can serve any client: clients' state lives in their
  own store (:mod:`fedpriv.client_state`), not in the worker.
* A round that hits ``round_timeout`` aggregates what came back; a worker still busy then without
  using any CPU (a hung client) is killed so that a fresh one serves the next rounds
  (:class:`WorkerGuard`), and when the run ends no busy worker holds the process open.
* Ctrl-C (SIGINT) ends the run after its last finished round (:class:`StopOnInterrupt`): the round
  in flight is abandoned, never recorded; the summary says "interrupted"; a second Ctrl-C, or a
  stop that takes longer than ``STOP_GRACE`` seconds, kills this run's Ray processes at once.
* Ray is always started afresh for the run (``address="local"``) unless ``placement.address``
  names a cluster: never joined silently through ``RAY_ADDRESS`` or a cluster that ``ray start``
  left on this machine.
* The driver (this process: the server's aggregation, checks and accountant) runs numpy's BLAS on
  one thread (:func:`single_threaded_blas`): it shares the machine's cores with the workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv import proctree, run_folder
from fedpriv.callbacks import Callback
from fedpriv.cluster_pool import cluster_actor_pool
from fedpriv.client_app import app as client_app
from fedpriv.config import ConfigError, PlacementConfig, RunConfig
from fedpriv.engine import RoundInterrupted, RoundResult, RunState
from fedpriv.federation import run_federation
from fedpriv.prompt_dispatch import prompt_dispatch
from fedpriv.task import encode_config
from fedpriv.worker_pool import release_held, warm_workers

log = logging.getLogger("fedpriv")

WORKER_TITLE = "ray::ClientAppActor"  # what Ray names Flower's client workers ("...ClientAppActor.run" while busy)
STOP_GRACE = 30.0  # seconds a Ctrl-C'd run has to stop cleanly before its Ray processes are killed


def visible_gpus() -> int:
    """GPUs this machine shows to CUDA (0 without a driver)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def check_cluster_address(address: str, timeout: float = 5.0) -> None:
    """An explicit ``host:port`` of a Ray head that answers; never ``auto``, which would join
    whatever cluster runs on this machine, perhaps another program's."""
    if address == "auto" or ":" not in address:
        raise ConfigError(f"config key 'placement.address': {address!r}; give the Ray head's HOST:PORT (the address "
                          "`ray start --head` prints), so that a run never joins another program's cluster")
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key 'placement.address': no Ray head answers at {address} within {timeout:g} s "
                          f"({type(exc).__name__}); start it with `ray start --head` or fix the address") from None


def check_placement(pl: PlacementConfig, gpus_available: int | None = None) -> None:
    """Refuse, before Ray starts, a placement this machine cannot host: GPUs it does not have, a
    client actor larger than the machine (Ray would idle every round until the timeout), or a
    cluster address that is implicit or does not answer."""
    gpus = visible_gpus() if gpus_available is None else gpus_available
    if pl.name == "cluster" or pl.address is not None:
        check_cluster_address(str(pl.address or "auto"))
        return  # an existing cluster: its CPUs and GPUs are not ours to count
    cpus = pl.num_cpus or os.cpu_count() or 1
    if pl.num_cpus_per_client > cpus:
        raise ConfigError(f"config key 'placement.num_cpus_per_client': {pl.num_cpus_per_client:g} CPUs per client, "
                          f"but Ray has {cpus} here: no client could ever run; allowed: at most {cpus}")
    wants_gpu = pl.num_gpus_per_client > 0 or pl.server_device == "cuda"
    if wants_gpu and gpus == 0:
        raise ConfigError(
            f"config key 'placement' ({pl.name}): asks for GPUs (num_gpus_per_client={pl.num_gpus_per_client}, "
            f"server_device={pl.server_device}) but this machine has none; use placement=cpu"
        )
    if pl.num_gpus is not None and pl.num_gpus > gpus:
        raise ConfigError(f"config key 'placement.num_gpus': {pl.num_gpus} requested, {gpus} visible")


def backend_config(pl: PlacementConfig) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources and ``ray.init`` arguments."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "error", "log_to_driver": True}
    if pl.address is not None:
        init_args["address"] = pl.address
    else:  # a Ray of our own: never RAY_ADDRESS's, nor a cluster `ray start` left running here
        init_args["address"] = "local"
        if pl.num_cpus is not None:
            init_args["num_cpus"] = pl.num_cpus
        if pl.num_gpus is not None:
            init_args["num_gpus"] = pl.num_gpus
        if pl.object_store_memory is not None:
            init_args["object_store_memory"] = pl.object_store_memory
    return {
        "client_resources": {"num_cpus": pl.num_cpus_per_client, "num_gpus": pl.num_gpus_per_client},
        "init_args": init_args,
    }


def concurrent_clients(pl: PlacementConfig, cpus: int | None = None, gpus: int | None = None) -> int:
    """How many client actors Ray can run at once on this machine for this placement."""
    cpus = pl.num_cpus or cpus or os.cpu_count() or 1
    n = math.floor(cpus / pl.num_cpus_per_client + 1e-9)
    if pl.num_gpus_per_client > 0:
        g = pl.num_gpus if pl.num_gpus is not None else (gpus if gpus is not None else visible_gpus())
        n = min(n, math.floor(g / pl.num_gpus_per_client + 1e-9))
    return max(n, 0)


def num_simulated_nodes(rc: RunConfig) -> int:
    """Flower nodes to register: one per worker (Ray actor that can run at once), never one per client.

    Each round sends every worker one message with its share of the cohort (:mod:`clients.cohort`),
    so more nodes than workers would only queue; Flower's engine also does work per registered node
    on every poll. ``placement.num_nodes`` overrides (e.g. for a remote cluster's size).
    """
    if rc.placement.num_nodes is not None:
        return max(1, min(rc.placement.num_nodes, rc.num_clients))
    return max(1, min(concurrent_clients(rc.placement), rc.num_clients))


def worker_options() -> dict[str, Any]:
    """Ray actor options for the client workers beyond their resources (Flower passes
    ``client_resources`` to ``ClientAppActor.options``): a worker that dies is restarted, as often as
    it takes. Its task is not retried: the clients it was training count as failed that round, and
    no client trains twice for one round. (Ray fails at once a task sent to a worker while it
    restarts; :class:`WorkerGuard` therefore lets the replacement start before the next round.)"""
    return {"max_restarts": -1, "max_task_retries": 0}


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit this process's BLAS (numpy's OpenBLAS) to one thread while the simulation runs.

    Ray gives its workers OMP_NUM_THREADS=1, not the driver. There a multi-threaded BLAS wins nothing
    (the server's vector work is small) and costs a core: after each call OpenBLAS's spare threads
    spin-wait (measured: a reply's norm check, ``np.vdot`` on a 103k-parameter update, kept one
    thread spinning ~95 ms a round, on a core a worker was training on). threadpoolctl is the
    maintained way to set an already loaded BLAS's thread count; the limit is undone on exit."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def ray_processes() -> dict[int, str]:
    """This process's own Ray processes (a Ray it started; none for a remote cluster): PID -> title."""
    me = os.getpid()
    stat = proctree.proc_stat(me)
    found = proctree.descendants({me: stat[3]}) if stat else set()
    titles = {pid: proctree.cmdline(pid) for pid in found}
    return {pid: t for pid, t in titles.items() if t.startswith("ray::") or f"{os.sep}ray{os.sep}" in t}


def workers() -> dict[int, bool]:
    """The client workers of this process's Ray: PID -> busy (running a task now)."""
    return {pid: title != WORKER_TITLE for pid, title in ray_processes().items()
            if title == WORKER_TITLE or title.startswith(WORKER_TITLE + ".")}


def stalled_workers(sample: float = 1.0) -> list[int]:
    """Busy workers whose CPU time does not move over ``sample`` seconds (hung: stopped, deadlocked,
    asleep or blocked on I/O)."""
    busy = {pid: proctree.cpu_ticks(pid) for pid, is_busy in workers().items() if is_busy}
    if not busy:
        return []
    time.sleep(sample)
    now = workers()
    return [pid for pid, ticks in busy.items() if now.get(pid) and proctree.cpu_ticks(pid) == ticks]


class WorkerGuard(Callback):
    """Keeps the simulation's workers fit between rounds (a Ray started here; nothing to do on a
    remote cluster, whose processes are not ours to see).

    After a round that timed out (clients dropped), a worker still running a task that uses no CPU
    (over a second) holds a hung client whose reply nobody awaits any more: it is killed, so that
    Ray starts a fresh one. A busy worker that computes (a slow client, or a worker
    still starting on a loaded machine) is left to finish: killing it would only start another.
    After a round with failed or dropped clients, the next round waits (at most ``wait`` seconds)
    until every worker of Flower's pool runs again, so that a dead worker's replacement, not its
    corpse, gets the next share. :meth:`release` kills busy workers when the run ends, so that no
    abandoned task holds the simulation (and the process) open.
    """

    def __init__(self, pool_size: Callable[[], int], wait: float):
        self.pool_size, self.wait = pool_size, wait  # pool_size: Flower's count of workers (Ray is up by then)

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        rec, killed = result.record, []
        if rec.get("num_dropped", 0) > 0:
            killed = proctree.kill_all(stalled_workers())
            if killed:
                log.warning("round %d: %d worker(s) hung past the round's timeout were stopped; Ray starts "
                            "replacements", result.server_round, len(killed))
        if rec.get("num_dropped", 0) > 0 or rec.get("num_failed", 0) > 0:
            self.wait_for_workers(result.server_round, gone=set(killed))
        return False

    def wait_for_workers(self, rnd: int, gone: set[int] = frozenset()) -> None:
        """Wait until Flower's pool of workers runs again; ``gone``: PIDs just killed, which do not
        count even while their process is still listed (dying), so that the wait covers Ray's restart
        of their actors and not only the corpse's last moments."""
        expected, deadline = self.pool_size(), time.monotonic() + self.wait
        alive = lambda: len(set(workers()) - gone)  # noqa: E731
        while alive() < expected:
            if time.monotonic() > deadline:
                log.warning("after round %d: only %d of %d workers run again after %g s; going on",
                            rnd, alive(), expected, self.wait)
                return
            time.sleep(0.2)

    @staticmethod
    def release() -> None:
        proctree.kill_all([pid for pid, busy in workers().items() if busy])


class StopOnInterrupt:
    """Ctrl-C (SIGINT) sets :attr:`event`, which ends the run after its last finished round;
    a second Ctrl-C, or a stop that takes more than ``grace`` seconds, kills this run's Ray
    processes and exits at once (code 130). Installed only in the main thread (signals go there)."""

    def __init__(self, grace: float = STOP_GRACE):
        self.event, self.grace = threading.Event(), grace
        self.previous: Any = None
        self.timer: threading.Timer | None = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.previous is None:
            return
        if self.event.is_set():  # Ray is down; the launcher is about to exit 130: another Ctrl-C exits now
            signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
        else:
            signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            self.hard_stop("a second Ctrl-C")
        self.event.set()
        # os.write, not print: a signal handler may interrupt a print to the same stream
        os.write(2, b"fedpriv: stopping after the last finished round (Ctrl-C again to stop at once)\n")
        logging.getLogger("flwr").setLevel(logging.CRITICAL)  # its errors about the abandoned tasks are expected
        self.timer = threading.Timer(self.grace, self.hard_stop, args=(f"no clean stop within {self.grace:g} s",))
        self.timer.daemon = True
        self.timer.start()

    @staticmethod
    def hard_stop(why: str) -> None:
        proctree.kill_all(ray_processes())
        print(f"fedpriv: interrupted ({why}): Ray stopped; every finished round is kept", file=sys.stderr, flush=True)
        os._exit(130)


def _server_app(rc: RunConfig, stop: threading.Event, guard: WorkerGuard) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, rc, extra_callbacks=[guard], stop=stop)
        finally:
            guard.release()  # whatever ended the run, no busy worker may hold the simulation open

    return server


def run_simulation(rc: RunConfig, keep_workers: bool = False) -> dict[str, Any]:
    """Run ``rc`` on Flower's simulation engine; returns the summary the run wrote (its
    ``stop_reason`` is "interrupted" after Ctrl-C).

    ``keep_workers``: leave Ray and the warm client workers running for the next run of this process
    (the jobs of a sweep, :mod:`fedpriv.worker_pool`); they are stopped when the process exits."""
    # Flower's simulation imports Ray (0.6 s): loaded when a simulation runs, not by every launcher
    # that only validates (a refused configuration exits before it).
    from flwr.simulation import run_simulation as flower_run_simulation
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    check_placement(rc.placement)
    assert rc.run_dir is not None
    run_dir = Path(rc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / run_folder.SUMMARY
    if summary_path.exists():  # a resumed run writes its summary again
        summary_path.unlink()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if os.environ.get("RAY_ADDRESS") and rc.placement.address is None:
        log.warning("RAY_ADDRESS is set but ignored: placement=%s starts a Ray of its own; to run on that cluster, "
                    "give placement=cluster placement.address=HOST:PORT", rc.placement.name)
    backend = backend_config(rc.placement)
    resources = dict(backend["client_resources"])
    backend["client_resources"].update(worker_options())
    guard = WorkerGuard(lambda: pool_size_from_resources(resources) if rc.placement.address is None else 0,
                        wait=min(rc.round_timeout, 120.0))
    on_cluster = cluster_actor_pool() if rc.placement.address is not None else contextlib.nullcontext()
    warm = warm_workers(backend, encode_config(rc), keep=keep_workers)
    with StopOnInterrupt() as interrupt, on_cluster, warm, prompt_dispatch(), single_threaded_blas():
        try:
            flower_run_simulation(
                server_app=_server_app(rc, interrupt.event, guard),
                client_app=client_app,
                num_supernodes=num_simulated_nodes(rc),
                backend_name="ray",
                backend_config=backend,
            )
        except RoundInterrupted:  # stopped before the round loop began (e.g. the analytics query)
            pass
        if not keep_workers or interrupt.event.is_set():
            if keep_workers:
                release_held()
            proctree.kill_all(ray_processes())  # Flower shut Ray down; anything of it still here goes too
    if not summary_path.exists():
        if interrupt.event.is_set():
            return {"rounds_completed": _rounds_recorded(run_dir), "rounds_planned": rc.num_rounds,
                    "stop_reason": "interrupted"}
        raise RuntimeError(f"the run stopped before writing {summary_path}; see the log above")
    return run_folder.read_summary(run_dir)


def _rounds_recorded(run_dir: Path) -> int:
    checkpoint = run_folder.load_checkpoint(run_dir)
    return int(checkpoint["round"]) if checkpoint else 0
