"""The faults a simulation must survive (issue 13), injected from outside as they happen in real
life: a worker process killed (as the OOM killer does), a client that hangs (its worker stopped),
Ctrl-C on the launcher's terminal, and a placement or cluster that cannot host the run.

The slow tests start ``scripts/simulate.py`` (Ray included) in its own session. They never race
the clock: :mod:`fedpriv.fault_gate` holds every training task of one chosen round at a gate, each
task announcing its worker's PID as it arrives, so a fault lands on a worker that is provably
mid-task on any machine, however fast or loaded; the test then opens the gate for the others.
Every wait below is for an event (a file, a published round, an exit), bounded far above its need.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dp_accounting import dp_event, pld

from conftest import InProcessGrid
from fedpriv import fault_gate, proctree, run_folder
from fedpriv.compose import compose_config
from fedpriv.federation import run_federation
from fedpriv.simulation import WORKER_TITLE, backend_config

ROOT = Path(__file__).resolve().parents[1]
SIMULATE = [sys.executable, str(ROOT / "scripts" / "simulate.py")]
CLIENTS = 6
FAST = [f"num_clients={CLIENTS}", f"clients_per_round={CLIENTS}", "sampling=all", "train.local_epochs=2",
        "tracking.progress=false"]
GATED_ROUND = 3  # rounds 1 and 2 publish first: the workers are warm, the run is checkpointing
STOPPING = "fedpriv: stopping after the last finished round"


class Run:
    """``scripts/simulate.py`` in its own session, its round ``gate_round`` held at the fault gate;
    watches its Ray processes while it runs."""

    def __init__(self, run_dir: Path, *overrides: str, gate_round: int = GATED_ROUND,
                 env: dict[str, str] | None = None):
        self.run_dir, self.gate_round = run_dir, gate_round
        self.gate = run_dir.parent / f"{run_dir.name}.gate"
        self.gate.mkdir()
        self.err_path = run_dir.parent / f"{run_dir.name}.stderr"
        self.proc = subprocess.Popen(
            [*SIMULATE, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), fault_gate.ENV: f"{self.gate}:{gate_round}", **(env or {})},
            stdout=subprocess.DEVNULL, stderr=self.err_path.open("w"),
        )
        self.start = proctree.proc_stat(self.proc.pid)[3]
        self.ray_seen: set[int] = set()  # every Ray process of the run, to check none outlives it
        self.workers_seen: set[int] = set()

    def ray(self) -> dict[int, str]:
        found = {pid: proctree.cmdline(pid) for pid in proctree.descendants({self.proc.pid: self.start})}
        ray = {pid: t for pid, t in found.items() if t.startswith("ray::") or "/ray/" in t}
        self.ray_seen |= set(ray)
        self.workers_seen |= {pid for pid, t in ray.items() if t.startswith(WORKER_TITLE)}
        return ray

    def rounds(self) -> list[dict]:
        return run_folder.read_jsonl(self.run_dir / "metrics.jsonl") if (self.run_dir / "metrics.jsonl").exists() else []

    def gated_worker(self, timeout: float = 300) -> int:
        """The PID of a worker held mid-task at the gate (round ``gate_round`` is in flight)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.ray()
            held = sorted(self.gate.glob("busy.*"))
            if held:
                self.ray()  # every worker of the run is up by now
                return int(held[0].suffix[1:])
            time.sleep(0.01)
        self.fail(f"no task reached the gate of round {self.gate_round}")

    def open_gate(self) -> None:
        (self.gate / "open").touch()

    def wait_for_stderr(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr() and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.01)
        if text not in self.stderr():
            self.fail(f"{text!r} never appeared")

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.ray()
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.fail(f"still running after {timeout:g} s")
        return self.proc.returncode

    def stderr(self) -> str:
        return self.err_path.read_text()

    def fail(self, why: str) -> None:
        self.kill()
        pytest.fail(f"{why}; stderr:\n{self.stderr()[-3000:]}")

    def kill(self) -> None:
        proctree.kill_all(proctree.descendants({self.proc.pid: self.start}) | {self.proc.pid})
        self.proc.wait(timeout=30)

    def ray_left(self, timeout: float = 30) -> list[int]:
        """Ray processes of the run still alive once their last moments (up to ``timeout``) passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = sorted(pid for pid in self.ray_seen if proctree.pid_alive(pid))
            if not alive:
                return []
            time.sleep(0.1)
        return alive


def share(workers: set[int]) -> int:
    """Clients of one worker's share (the cohort spread over the workers)."""
    return math.ceil(CLIENTS / max(1, len(workers)))


@pytest.mark.slow
def test_a_worker_that_dies_costs_only_its_round_and_is_replaced(tmp_path):
    # RAY_ADDRESS names something that is not this run's Ray: a run that joined it would fail
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        run = Run(tmp_path / "run", *FAST, "num_rounds=5",
                  env={"RAY_ADDRESS": f"127.0.0.1:{other.getsockname()[1]}"})
        victim = run.gated_worker()
        first_workers = set(run.workers_seen)
        assert victim in first_workers
        os.kill(victim, signal.SIGKILL)  # as the OOM killer does
        run.open_gate()
        assert run.wait() == 0, run.stderr()[-3000:]
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert all(r["num_failed"] == 0 for r in rounds[:GATED_ROUND - 1]), rounds
    hit = rounds[GATED_ROUND - 1]  # the round in flight when the worker died
    assert 1 <= hit["num_failed"] <= share(first_workers) and hit["num_clients"] + hit["num_failed"] == CLIENTS
    for r in rounds[GATED_ROUND:]:  # a replacement serves the later rounds: nobody fails
        assert (r["num_clients"], r["num_failed"], r["num_dropped"]) == (CLIENTS, 0, 0), rounds
    assert run.workers_seen - first_workers, "no replacement worker started"
    assert run.ray_left() == []


@pytest.mark.slow
def test_a_hung_client_is_bounded_by_round_timeout_and_the_run_ends(tmp_path):
    # the timeout bounds every round, the first one's worker start-up included (a few seconds
    # here): 30 s leaves a loaded or one-core machine room, and only the hung round waits it out
    run = Run(tmp_path / "run", *FAST, "num_rounds=5", "round_timeout=30")
    victim = run.gated_worker()
    first_workers = set(run.workers_seen)
    os.kill(victim, signal.SIGSTOP)  # hangs: alive, silent, using no CPU
    run.open_gate()
    assert run.wait() == 0, run.stderr()[-3000:]
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    hung = rounds[GATED_ROUND - 1]
    assert 1 <= hung["num_dropped"] <= share(first_workers)  # what came back was aggregated; the rest dropped
    assert hung["num_clients"] + hung["num_dropped"] == CLIENTS
    assert (rounds[-1]["num_clients"], rounds[-1]["num_dropped"]) == (CLIENTS, 0)  # a fresh worker took over
    assert "hung past the round's timeout" in (run.run_dir / "simulate.log").read_text()  # Hydra's log of the run
    assert not proctree.pid_alive(victim)
    assert json.loads((run.run_dir / "summary.json").read_text())["rounds_completed"] == 5
    assert run.ray_left() == []


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_finished_rounds_and_resumes(tmp_path):
    central = ["privacy=central", "privacy.target_epsilon=8", "num_rounds=8"]
    run = Run(tmp_path / "run", *FAST, *central)
    run.gated_worker()  # round 3 is in flight, rounds 1 and 2 finished
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher's whole process group
    run.wait_for_stderr(STOPPING)
    run.open_gate()  # the held tasks may now reply: the round is abandoned all the same
    assert run.wait(timeout=120) == 130
    err = run.stderr()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fedpriv: interrupted")]
    assert len(lines) == 1 and "resume=true" in lines[0], err[-3000:]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    kept = GATED_ROUND - 1
    assert (summary["stop_reason"], summary["rounds_completed"]) == ("interrupted", kept)
    assert [r["round"] for r in run.rounds()] == list(range(1, kept + 1))  # every finished round, no other
    assert run_folder.load_checkpoint(run.run_dir)["round"] == kept
    raw = run_folder.read_jsonl(run.run_dir / run_folder.DIAGNOSTICS)  # operator-only: clients per round
    assert [r["num_clients"] for r in raw] == [CLIENTS] * kept  # no noise-only round recorded
    assert run.ray_left() == []

    resumed = subprocess.run([*SIMULATE, *FAST, *central, "resume=true", f"run_dir={run.run_dir}",
                              f"hydra.run.dir={tmp_path / 'hydra2'}"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in run.rounds()] == list(range(1, 9))
    assert json.loads((run.run_dir / "summary.json").read_text())["stop_reason"] == "completed"


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run = Run(tmp_path / "run", *FAST, "num_rounds=40", gate_round=2)
    run.gated_worker()  # round 2 held: the first Ctrl-C's clean stop is under way when the second lands
    os.killpg(run.proc.pid, signal.SIGINT)
    run.wait_for_stderr(STOPPING)  # the first was taken (two signals at once would be one)
    try:
        os.killpg(run.proc.pid, signal.SIGINT)
    except ProcessLookupError:  # the clean stop won the race: exit 130 all the same
        pass
    run.open_gate()
    assert run.wait(timeout=120) == 130
    err = run.stderr()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert len([ln for ln in err.splitlines() if ln.startswith("fedpriv: interrupted")]) == 1, err[-3000:]
    published = [r["round"] for r in run.rounds()]
    assert published == [1]  # round 2 never finished
    assert run_folder.load_checkpoint(run.run_dir)["round"] == 1
    assert run.ray_left() == []


class StallingGrid(InProcessGrid):
    """Round 2's replies never come, and Ctrl-C (the stop event) arrives while they are awaited."""

    def __init__(self, stop: threading.Event, **kwargs):
        super().__init__(**kwargs)
        self.stop = stop

    def push_messages(self, messages):
        messages = list(messages)
        if messages[0].metadata.group_id == "2":
            self.stop.set()
            return ["lost"] * len(messages)
        return super().push_messages(messages)


def test_a_round_interrupted_while_awaited_is_abandoned_not_recorded(tmp_path, flower_run_identity):
    """Under central DP a round with no replies would still release noise: an interrupted round
    must not be aggregated, recorded, published nor counted by the accountant."""
    stop = threading.Event()
    rc = compose_config(["num_clients=6", "clients_per_round=6", "sampling=all", "num_rounds=4", "privacy=central",
                         "privacy.noise_multiplier=1.0", "privacy.target_epsilon=100", "round_timeout=120",
                         "tracking.progress=false", f"run_dir={tmp_path}"])
    summary = run_federation(StallingGrid(stop, num_nodes=2), rc, stop=stop)  # without the stop: 120 s, then recorded
    assert (summary["stop_reason"], summary["rounds_completed"]) == ("interrupted", 1)
    assert [r["round"] for r in run_folder.read_metrics(tmp_path)] == [1]
    assert [r["round"] for r in run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)] == [1]
    assert run_folder.load_checkpoint(tmp_path)["round"] == 1
    # the accountant saw one release of the Gaussian mechanism (every client sampled, z = 1), not two
    def epsilon(rounds: int) -> float:
        return pld.PLDAccountant().compose(dp_event.GaussianDpEvent(1.0), rounds).get_epsilon(summary["delta"])

    assert summary["epsilon"] == pytest.approx(epsilon(1), rel=1e-2)
    assert epsilon(2) > 1.3 * epsilon(1)


def test_a_run_never_joins_a_ray_it_did_not_start(tmp_path, monkeypatch):
    """placement=cpu (and every placement without an address) starts its own Ray: Ray's own
    address resolution gives "start a new local instance" for our init arguments, even where
    RAY_ADDRESS names a cluster and `ray start` left one on this machine; the defaults would join."""
    from ray._private.services import canonicalize_bootstrap_address

    monkeypatch.setenv("RAY_ADDRESS", "10.9.8.7:6390")
    (tmp_path / "ray_current_cluster").write_text("10.9.8.6:6391")  # what `ray start` leaves behind
    for group in ("cpu", "gpu", "multi_gpu"):
        init = backend_config(compose_config(f"placement={group}").placement)["init_args"]
        assert canonicalize_bootstrap_address(init.get("address"), str(tmp_path)) is None, group
    assert canonicalize_bootstrap_address(None, str(tmp_path)) == "10.9.8.7:6390"  # Ray's default joins
    monkeypatch.delenv("RAY_ADDRESS")
    assert canonicalize_bootstrap_address(None, str(tmp_path)) == "10.9.8.6:6391"
    cluster = compose_config("placement=cluster placement.address=10.1.2.3:6379").placement
    assert backend_config(cluster)["init_args"]["address"] == "10.1.2.3:6379"  # named: the user's choice


def test_the_fault_gate_holds_only_its_round_until_opened(tmp_path, monkeypatch):
    monkeypatch.delenv(fault_gate.ENV, raising=False)
    fault_gate.hold(3)  # off: returns at once, writes nothing
    monkeypatch.setenv(fault_gate.ENV, f"{tmp_path}:3")
    fault_gate.hold(2)  # another round passes straight through
    assert list(tmp_path.iterdir()) == []
    held = threading.Thread(target=fault_gate.hold, args=(3,), daemon=True)
    held.start()
    marker = tmp_path / f"busy.{os.getpid()}"
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.read_text() == "3" and held.is_alive()  # mid-task, announced, waiting
    (tmp_path / "open").touch()
    held.join(timeout=60)
    assert not held.is_alive()
    with pytest.raises(ValueError, match="<folder>:<round>"):
        fault_gate.parse("no-round-here")
