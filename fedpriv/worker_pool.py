"""Client workers that start warm, and that the jobs of a sweep (``-m``) share.

Flower's Ray backend creates its workers (``ClientAppActor``) when a simulation starts, and each
worker imports torch, Flower and fedpriv and loads its data set only when the first message of the
run reaches it; when the simulation ends it stops the workers and Ray. A sweep of N jobs paid that
start (Ray ~4 s, each worker ~3.5 s of imports on 2 cores) N times.

:func:`warm_workers` changes two things for the runs inside the block, and nothing a client computes:

* **Warm start.** Each worker runs :func:`start_warm_up` as it is created (Flower's ``on_actor_init_fn``):
  it imports the ClientApp's modules and, on a thread, loads the run's data set and model while the
  server assembles the run, instead of when round 1's message arrives. A failure there is logged and
  left for round 1 to meet and report as usual. Ray runs it again in a worker it restarts.
* **Reuse** (``keep=True``, the jobs of a Hydra multirun): when the run ends, Ray and its workers
  stay up for the next job in this process, which takes them over if its placement asks for the
  same Ray (``ray.init`` arguments) and the same workers (resources per client); otherwise they
  are stopped first. Whatever is held is stopped when the process exits. A worker carries nothing
  from one job to the next that a client could see: every client's state lives in its own store
  (:mod:`fedpriv.client_state`), the run's configuration arrives in each message, and what a worker
  caches (data sets, the frozen base of a language model) is keyed by that configuration.

Written here because Flower's backend has no option for either (it is the same patch point as
:mod:`fedpriv.cluster_pool`, composed with it on a cluster). No privacy meaning.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

log = logging.getLogger("fedpriv")


def warm_up(task: str) -> None:
    """In a new worker: import the ClientApp (torch, Flower, Opacus, fedpriv's clients) and let it load
    the run's data set and model (:func:`fedpriv.client_app.warm_up`)."""
    # Imported here, on the warm-up thread, not when Ray unpickles start_warm_up in the worker's
    # __init__: Ray counts a worker alive only once __init__ returns (tests/test_architecture.LAZY_OK).
    from fedpriv import client_app

    client_app.warm_up(task)


def start_warm_up(task: str) -> None:
    """A worker's ``on_actor_init_fn``: :func:`warm_up` on a thread of its own, so that the worker counts
    as alive at once (Ray fails a task sent to a worker still in its ``__init__``, e.g. one it restarts)
    and a message that arrives meanwhile simply waits for the same imports and loads."""
    threading.Thread(target=warm_up, args=(task,), name="fedpriv-warm-up", daemon=True).start()


@dataclass
class HeldWorkers:
    """Ray and the workers one run left for the next job of this process."""

    key: str = ""  # ray.init arguments + resources per worker, as JSON
    actors: list[Any] = field(default_factory=list)


_HELD = HeldWorkers()
_LOCK = threading.Lock()


def workers_key(backend_config: dict[str, Any]) -> str:
    return json.dumps({"init": backend_config.get("init_args", {}),
                       "worker": backend_config.get("client_resources", {})}, sort_keys=True, default=str)


def held_workers() -> int:
    """How many workers a previous job left running in this process (0 when none)."""
    return len(_HELD.actors)


def release_held() -> None:
    """Stop the workers and the Ray a previous job left (nothing when none)."""
    import ray

    with _LOCK:
        actors, _HELD.actors, _HELD.key = _HELD.actors, [], ""
        if not ray.is_initialized():  # Ray's own exit hook stopped it (and its workers) already
            return
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        ray.shutdown()


atexit.register(lambda: held_workers() and release_held())


#: Seconds a task waits for a failed worker to be alive again before it is sent anyway (and fails).
ALIVE_WAIT = 60.0


def _await_alive(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):  # a worker that cannot come back fails its task as before
        ray.get(actor.__ray_ready__.remote(), timeout=ALIVE_WAIT)


def _pool_class(base: type, task: str, keep: bool) -> type:
    class WarmActorPool(base):  # type: ignore[misc, valid-type]
        """Flower's pool (or the cluster's), whose workers warm up as they start and may be held."""

        def __init__(self, actor_type: Any, client_resources: dict[str, Any], actor_kwargs: dict[str, Any]) -> None:
            kwargs = {**(actor_kwargs or {}), "on_actor_init_fn": functools.partial(start_warm_up, task)}
            super().__init__(actor_type, client_resources, kwargs)
            self._failed: set[int] = set()  # id() of workers whose last task failed: perhaps restarting

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> tuple[Any, Any]:
            actor = self._future_to_actor.get(future)
            try:
                return super().fetch_result_and_return_actor_to_pool(future)
            except Exception:
                if actor is not None:
                    self._failed.add(id(actor))
                raise

        def submit(self, actor_fn: Any, job: Any) -> Any:
            # A worker whose task failed may be restarting (Ray restarts a dead one, max_restarts=-1), and
            # Ray fails at once a task sent before its __init__ returned: wait until it is alive. Only
            # with Flower's own pool, which takes the last idle worker; the cluster's replaces lost ones.
            if self._failed and self.pool and id(self.pool[-1]) in self._failed:
                _await_alive(self.pool[-1])
                self._failed.discard(id(self.pool[-1]))
            return super().submit(actor_fn, job)

        def add_actors_to_pool(self, num_actors: int) -> None:
            with _LOCK:
                taken, _HELD.actors = _HELD.actors[:num_actors], _HELD.actors[num_actors:]
            self.pool.extend(taken)
            self.num_actors += len(taken)
            if taken:
                log.info("took over %d warm client worker(s) left by the previous job", len(taken))
            super().add_actors_to_pool(num_actors - len(taken))
            if keep:
                with _LOCK:
                    _HELD.actors = list(self.pool)  # every worker of this run, for the next job

        def terminate_all_actors(self) -> None:
            if not keep:
                super().terminate_all_actors()

    return WarmActorPool


@contextlib.contextmanager
def warm_workers(backend_config: dict[str, Any], task: str, keep: bool = False) -> Iterator[None]:
    """Run the simulations inside the block on warm workers; ``keep``: leave Ray and them up for the
    next job of this process (which reuses them when its placement matches, see the module docstring).

    ``task``: the run's configuration as it travels in messages (:func:`fedpriv.task.encode_config`)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    key = workers_key(backend_config)
    if _HELD.key and _HELD.key != key:  # another placement's Ray and workers: not this job's
        log.info("stopping the previous job's Ray and workers: this job's placement differs")
        release_held()
    pool_before, terminate_before = raybackend.BasicActorPool, raybackend.RayBackend.terminate
    raybackend.BasicActorPool = _pool_class(pool_before, task, keep)

    def terminate(backend: Any) -> None:  # Flower's terminate, minus ray.shutdown() while workers are held
        if backend.pool:
            backend.pool.terminate_all_actors()
        if not keep:
            ray.shutdown()

    raybackend.RayBackend.terminate = terminate
    try:
        yield
    finally:
        raybackend.BasicActorPool, raybackend.RayBackend.terminate = pool_before, terminate_before
        with _LOCK:
            _HELD.key = key if keep and _HELD.actors else ""
