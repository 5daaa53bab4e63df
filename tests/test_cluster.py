"""placement=cluster on a real multi-node Ray cluster, started here: a head (``ray start --head`` on
127.0.0.1 with its own temp folder) and a second node (``ray start --address=...``, its own temp folder
and resources). A run places workers on both nodes; the second node is killed mid-round (its raylet
and workers, as a machine that loses power); its clients fail for that round only and the run goes on
with the head's worker. The clients' own state (DP-SGD ledgers) lives in the run folder, which both
nodes see. Never ``ray stop``: that would stop every Ray on this machine, other tests' included; the
cluster's processes are found by their temp folder and killed with their descendants.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedpriv import fault_gate, proctree, run_folder

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
GATED_ROUND = 2
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


class Cluster:
    """Two Ray nodes on this machine; ``processes()`` finds everything of theirs."""

    def __init__(self, env: dict[str, str]):
        self.temp = Path(tempfile.mkdtemp(prefix="fpray", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env
        self.seen: set[int] = set()
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
        self._start([RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}/head",
                     "--include-dashboard=false", *common])
        self._start([RAY, "start", f"--address={self.address}", f"--temp-dir={self.temp}/second",
                     '--resources={"second_node": 1}', *common])

    def _start(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        self.record()
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def raylet(self, node: str) -> int:
        pids = [p for p in proctree.process_table() if "raylet/raylet" in proctree.cmdline(p)
                and f"{self.temp}/{node}/" in proctree.cmdline(p)]
        assert len(pids) == 1, (node, pids)
        return pids[0]

    def processes(self) -> set[int]:
        roots = {p: 0 for p in proctree.process_table() if str(self.temp) in proctree.cmdline(p)}
        return set(roots) | proctree.descendants(roots)

    def record(self) -> None:
        self.seen |= self.processes()

    def kill_node(self, node: str) -> None:
        raylet = self.raylet(node)
        proctree.kill_all(proctree.subtree(raylet))

    def stop(self) -> list[int]:
        for _ in range(3):
            self.record()
            proctree.kill_all(self.processes())
            time.sleep(0.5)
        left = [p for p in self.seen if proctree.pid_alive(p)]
        shutil.rmtree(self.temp, ignore_errors=True)
        return left


def test_a_run_uses_both_nodes_and_survives_losing_one(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           fault_gate.ENV: f"{gate}:{GATED_ROUND}"}  # the workers get the nodes' environment, not the launcher's
    cluster = Cluster(env)
    run_dir = tmp_path / "run"
    proc = None
    try:
        head, second = cluster.raylet("head"), cluster.raylet("second")
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "simulate.py"), "experiment=quickstart", "privacy=local",
             "num_clients=40", "clients_per_round=12", "num_rounds=4", "round_timeout=120",
             "placement=cluster", f"placement.address={cluster.address}", "placement.num_nodes=2",
             "tracking.progress=false", f"hydra.run.dir={run_dir}"],
            cwd=ROOT, env=env, start_new_session=True, stdout=(tmp_path / "output").open("w"),
            stderr=subprocess.STDOUT)
        busy = _wait(lambda: sorted(gate.glob("busy.*")) if len(list(gate.glob("busy.*"))) >= 2 else None,
                     240, "a task on each node at the gate", proc)
        cluster.record()
        parents = {proctree.proc_stat(int(b.suffix[1:]))[1] for b in busy}  # (state, ppid, ...) of each worker
        assert parents == {head, second}, f"workers under {parents}, raylets {head} (head), {second} (second)"
        cluster.kill_node("second")
        (gate / "open").touch()
        assert proc.wait(timeout=300) == 0, (tmp_path / "output").read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proctree.kill_all(proctree.subtree(proc.pid))
        left = cluster.stop()
    assert not left, f"Ray processes left behind: {left}"

    summary = run_folder.read_summary(run_dir)
    assert summary["rounds_completed"] == 4 and summary["stop_reason"] == "completed"
    log = (tmp_path / "output").read_text()
    failed_rounds = {int(m) for m in re.findall(r"round (\d+): client\(s\) failed", log)}
    assert failed_rounds == {GATED_ROUND}, failed_rounds  # the second node's share of that round, and no other
    # Every round's reports (the server's local-DP table), and the clients' ledgers: each written by
    # whichever node trained the client, into the one store both nodes see (the run folder).
    rounds = [json.loads(line) for line in (run_dir / "operator_only" / "local_monitor.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["obs"] for r in rounds)
    reported = {o[0] for r in rounds for o in r["obs"]}
    ledgers = list((run_dir / "operator_only" / "simulated_client_state").rglob("*.json"))
    assert len(ledgers) == len(reported), (len(ledgers), len(reported))
    assert 0 < summary["local_epsilon_max"] <= 8.0 + 1e-9
