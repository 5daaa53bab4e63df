"""Client workers on a multi-node Ray cluster that survive the loss of a node.

Flower's Ray backend keeps its workers (``ClientAppActor``) in a ``BasicActorPool`` and puts a worker
back after a failed task as if nothing happened. On this machine that is right: a dead worker is
restarted by Ray (``max_restarts=-1``) and :class:`fedpriv.simulation.WorkerGuard` lets the
replacement start before the next round. On a cluster, a worker whose *node* died cannot be
restarted where it was; Ray answers every later task with ``ActorUnavailableError`` at once, so
half the cohort of a two-node run failed in every round after one node was lost (measured: 72/144
clients failed in rounds 4-6). :class:`ClusterActorPool` is the same pool with one rule added: a worker
whose task failed with an actor error is killed and replaced by a new one, which Ray places wherever
the cluster has room and which joins the pool only once it is alive. Tasks wait for an idle live
worker (never for a worker that cannot be placed), so a smaller cluster runs the same rounds with
fewer workers. The clients of the failed task count as failed in that round only.

Written here because Flower's pool has no hook for it (its ``VirtualClientEngineActorPool`` drops
dead actors but is not the one the Ray backend uses). No privacy meaning: which worker trains a
client changes nothing it computes or sends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator

log = logging.getLogger("fedpriv")

POLL = 0.05  # seconds between looks for an idle worker


def _actor_error_types() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError)


def _pool_class() -> type:
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    class ClusterActorPool(BasicActorPool):  # type: ignore[misc, valid-type]
        """Flower's pool, minus the workers a lost node took with it (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._lock = threading.Lock()
            self._pending: list[tuple[Any, Any]] = []  # (replacement worker, its ready ref)
            self.replaced = 0

        def _promote_ready(self) -> None:
            import ray

            if not self._pending:
                return
            ready, _ = ray.wait([ref for _, ref in self._pending], num_returns=len(self._pending), timeout=0)
            ready_ids = {id(r) for r in ready}
            still = []
            for actor, ref in self._pending:
                (self.pool.append(actor) if id(ref) in ready_ids else still.append((actor, ref)))
            self._pending = still

        def is_actor_available(self) -> bool:
            with self._lock:
                self._promote_ready()
                return len(self.pool) > 0

        def submit(self, actor_fn: Any, job: Any) -> Any:
            while True:  # an idle live worker, however long the cluster needs to place one
                with self._lock:
                    self._promote_ready()
                    if self.pool:
                        actor = self.pool.pop()
                        app_fn, mssg, cid, context = job
                        future = actor_fn(actor, app_fn, mssg, cid, context)
                        self._future_to_actor[future] = actor
                        return future
                time.sleep(POLL)

        def add_actor_back_to_pool(self, future: Any) -> None:
            with self._lock:  # a lost worker's future is gone already (Flower calls this after any error)
                actor = self._future_to_actor.pop(future, None)
                if actor is not None:
                    self.pool.append(actor)

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> tuple[Any, Any]:
            import ray

            try:
                return super().fetch_result_and_return_actor_to_pool(future)
            except _actor_error_types() as exc:
                with self._lock:
                    actor = self._future_to_actor.pop(future, None)
                    if actor is not None:
                        with contextlib.suppress(Exception):
                            ray.kill(actor, no_restart=True)
                        replacement = self.create_actor_fn()
                        self._pending.append((replacement, replacement.__ray_ready__.remote()))
                        self.replaced += 1
                log.warning("a client worker was lost (%s); a replacement joins when the cluster can place it",
                            type(exc).__name__)
                raise

    return ClusterActorPool


@contextlib.contextmanager
def cluster_actor_pool() -> Iterator[None]:
    """Make Flower's Ray backend build :class:`ClusterActorPool` for the runs inside the block."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    before = raybackend.BasicActorPool
    raybackend.BasicActorPool = _pool_class()
    try:
        yield
    finally:
        raybackend.BasicActorPool = before
