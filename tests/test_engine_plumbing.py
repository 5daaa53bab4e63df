"""The simulation engine's plumbing around Flower: prompt dispatch of pushed messages
(fedpriv.prompt_dispatch) and warm workers that a sweep's jobs share (fedpriv.worker_pool)."""

from __future__ import annotations

import math
import queue
import threading

import pytest

from fedpriv import prompt_dispatch, worker_pool


class FakeLinkState:
    """The two calls of Flower's in-memory link state the dispatch thread uses."""

    def __init__(self):
        self.inbox: dict[int, list[str]] = {}
        self.lock = threading.Lock()

    def store_message_ins(self, node_id: int, message: str) -> None:
        with self.lock:
            self.inbox.setdefault(node_id, []).append(message)

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        with self.lock:
            got, self.inbox[node_id] = self.inbox.get(node_id, [])[:limit], self.inbox.get(node_id, [])[limit:]
            return got


@pytest.fixture
def dispatcher(monkeypatch):
    """The dispatch thread over a fake state, its idle scan a minute long: a message reaches the queue
    within the test's 20 s only if storing it woke the thread."""
    monkeypatch.setattr(prompt_dispatch, "IDLE_SCAN", 60.0)
    state, out, stop = FakeLinkState(), queue.Queue(), threading.Event()
    thread = threading.Thread(target=prompt_dispatch._add_messages_to_queue, args=(state, out, {1: 0, 2: 1}, stop))
    thread.start()
    yield state, out
    stop.set()
    state.store_message_ins(1, "wake")  # the thread sleeps until a store (or a minute): end it now
    thread.join(timeout=20)
    assert not thread.is_alive()


def test_a_stored_message_wakes_the_dispatch_thread(dispatcher):
    state, out = dispatcher
    for round_ in range(3):  # again after each wake-up: the event is re-armed before every scan
        state.store_message_ins(2, f"round {round_}")
        assert out.get(timeout=20) == f"round {round_}"


def test_several_messages_for_one_node_all_leave_at_once(dispatcher):
    state, out = dispatcher
    with state.lock:  # stored together, before the thread scans: one message per node per scan
        state.inbox[1] = ["a", "b", "c"]
    state.store_message_ins(2, "d")
    assert sorted(out.get(timeout=20) for _ in range(4)) == ["a", "b", "c", "d"]


def test_the_patch_is_undone_after_the_block():
    from flwr.server.superlink.fleet.vce import vce_api

    flowers = vce_api.add_messages_to_queue
    with prompt_dispatch.prompt_dispatch():
        assert vce_api.add_messages_to_queue is prompt_dispatch._add_messages_to_queue
    assert vce_api.add_messages_to_queue is flowers


def test_workers_key_tells_placements_apart():
    a = {"init_args": {"address": "local", "num_cpus": 2}, "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    b = {"init_args": {"address": "local", "num_cpus": 1}, "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    c = {"init_args": {"address": "local", "num_cpus": 2}, "client_resources": {"num_cpus": 1, "num_gpus": 0.5}}
    assert worker_pool.workers_key(a) == worker_pool.workers_key(dict(reversed(list(a.items()))))
    assert len({worker_pool.workers_key(x) for x in (a, b, c)}) == 3


def test_warm_up_reports_a_broken_configuration_without_raising(caplog):
    worker_pool.warm_up('{"not": "a run configuration"}')  # the worker lives on; round 1 reports the fault
    assert "could not warm up" in caplog.text


def test_the_driver_runs_blas_on_one_thread_during_a_simulation_and_gets_its_threads_back():
    np = pytest.importorskip("numpy")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fedpriv.simulation import single_threaded_blas

    np.vdot(np.ones(4), np.ones(4))  # numpy's BLAS is loaded

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    assert blas_threads(), "no BLAS library found to limit"
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # a driver that would spin a spare thread
        before = blas_threads()
        with single_threaded_blas():
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == before


def test_a_client_worker_starts_without_importing_the_accountant_or_scipy_stats():
    """A worker imports fedpriv.client_app at start; dp-accounting's package (scipy.signal, scipy.stats:
    ~1 s of CPU a worker) waits until something computes an epsilon."""
    import subprocess
    import sys

    code = ("import sys, fedpriv.client_app\n"
            "print(sorted({m.split('.')[0] if m.startswith('dp_accounting') else m for m in sys.modules\n"
            "              if m.startswith(('dp_accounting', 'scipy.stats', 'scipy.signal'))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    from fedpriv.privacy import accounting
    from fedpriv.privacy.releases import DpRelease

    release = DpRelease(noise_multiplier=1.0, sampling="poisson", sampling_rate=0.05, count=3)
    assert 0 < accounting.epsilon((release,), 1e-5, "pld") < math.inf  # the lazy import still serves the accountant
