"""``flwr run .`` (Flower's supported path) runs the same simulation as ``scripts/simulate.py``.

The end-to-end checks start a SuperLink in simulation mode on a free port with a private
``$FLWR_HOME`` (:mod:`fedpriv.flwr_run`); nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpriv import flwr_app, flwr_run, run_folder
from fedpriv.compose import compose_config
from fedpriv.errors import ConfigError
from fedpriv.proctree import descendants, pid_alive, proc_stat
from fedpriv.simulation import num_simulated_nodes

ROOT = Path(__file__).resolve().parents[1]
# Seeded (privacy.secure_rng=false): both paths must then release the same models, round by round.
SAME = ["dataset=digits", "num_rounds=2", "privacy=central", "tracking.progress=false", "privacy.secure_rng=false"]
PUBLISHED = ["checkpoint.pt", "config.yaml", "metrics.jsonl", "model.pt", "privacy.json", "summary.json"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


def one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("fedpriv: error:")]
    assert len(errors) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return errors[0]


def run_and_watch(cmd: list[str], log: Path, timeout: float) -> tuple[subprocess.CompletedProcess, dict[int, int]]:
    """Run ``cmd`` in its own session (output to ``log``); every process seen below it meanwhile
    (pid -> start time)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, int] = {}
    root = {proc.pid: proc_stat(proc.pid)[3]}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in descendants(root):
            st = proc_stat(pid)
            if st is not None:
                seen.setdefault(pid, st[3])
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        pytest.fail(f"{cmd} did not end within {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), ""), seen


@pytest.mark.slow
def test_flwr_run_gives_the_same_run_as_simulate_and_leaves_no_process(tmp_path):
    sim_dir, flwr_dir = tmp_path / "simulate", tmp_path / "flwr"
    sim = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), *SAME, f"hydra.run.dir={sim_dir}"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert sim.returncode == 0, sim.stderr[-3000:]
    result, seen = run_and_watch([sys.executable, "-m", "fedpriv.flwr_run", *SAME, f"run_dir={flwr_dir}"],
                                 tmp_path / "flwr.log", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Successfully started run" in result.stdout  # it went through `flwr run`, not run_simulation
    # the federation is sized as scripts/simulate.py sizes its simulation
    nodes = num_simulated_nodes(compose_config(SAME))
    assert f"num-supernodes={nodes} client-resources-num-cpus=1" in result.stdout
    assert f"({nodes} simulated SuperNodes)" in result.stdout

    for name in PUBLISHED:
        assert (flwr_dir / name).is_file(), name
    assert (flwr_dir / run_folder.DIAGNOSTICS).is_file()
    s_sum, f_sum = (json.loads((d / "summary.json").read_text()) for d in (sim_dir, flwr_dir))
    assert set(f_sum) == set(s_sum)
    assert f_sum["epsilon"] == s_sum["epsilon"] and f_sum["delta"] == s_sum["delta"]
    assert f_sum["rounds_completed"] == 2 and f_sum["stop_reason"] == "completed"
    s_rounds, f_rounds = (run_folder.read_metrics(d) for d in (sim_dir, flwr_dir))
    assert [sorted(r) for r in f_rounds] == [sorted(r) for r in s_rounds]
    counts = ("num_sampled", "num_clients", "num_failed", "num_dropped")
    s_diag, f_diag = ([{k: r[k] for k in counts} for r in run_folder.read_jsonl(d / run_folder.DIAGNOSTICS)]
                      for d in (sim_dir, flwr_dir))
    assert f_diag == s_diag, "the two runs trained different clients (a failure in one of them?)"
    for s, f in zip(s_rounds, f_rounds):
        assert f["epsilon"] == s["epsilon"] and f["noise_std"] == s["noise_std"]
        # same seed, same sampled clients and noise: the same model, up to the order of a float sum
        assert f["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=0.02), (s_diag, f_diag)
    s_priv, f_priv = (json.loads((d / "privacy.json").read_text()) for d in (sim_dir, flwr_dir))
    assert set(f_priv) == set(s_priv)
    s_model, f_model = (torch.load(d / "model.pt", map_location="cpu") for d in (sim_dir, flwr_dir))
    assert set(f_model) == set(s_model)
    for key in s_model:  # measured: bit-identical; a tolerance only for the order of a float sum
        assert torch.allclose(f_model[key], s_model[key], atol=1e-5), key

    left = [pid for pid, start in seen.items() if pid_alive(pid, start)]
    assert not left, f"processes left behind: {left}"


def test_launcher_refuses_a_bad_override_in_one_line_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedpriv.flwr_run", "dataset.colour=red", f"run_dir={tmp_path / 'run'}"],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "config key 'dataset.colour'" in one_error_line(result.stderr)
    assert "flwr run" not in result.stdout  # nothing started
    assert not (tmp_path / "run").exists()


def test_server_app_refuses_a_bad_override_in_one_line(capsys):
    """What a bare ``flwr run . <connection> --run-config 'overrides="..."'`` gets: one line, the run ends."""
    assert flwr_app.serve(grid=None, run_config={"overrides": "dataset.colour=red"}, run_id=1) is None
    assert "config key 'dataset.colour'" in one_error_line(capsys.readouterr().out)


def test_placements_flower_cannot_honour_are_refused():
    fed = flwr_app.federation_config(compose_config(["placement.num_cpus_per_client=2"]))
    assert "client-resources-num-cpus=2" in fed
    for bad, key in ((["placement=cluster", "placement.address=127.0.0.1:6379"], "placement.address"),
                     (["placement.object_store_memory=100000000"], "placement.object_store_memory"),
                     (["placement.num_cpus_per_client=0.5"], "placement.num_cpus_per_client")):
        with pytest.raises(ConfigError, match=key):
            flwr_app.federation_config(compose_config(bad))


@pytest.mark.slow
def test_a_bad_override_under_a_bare_flwr_run_ends_the_run_in_one_line(tmp_path, capsys):
    """Without the launcher's check: the ServerApp refuses, and ``flwr run`` returns (no stalled run)."""
    link = flwr_run.LocalSuperLink(ROOT)
    failed = True
    try:
        link.start()
        flwr_run.flwr_run(link, ["dataset.colour=red", f"run_dir={tmp_path / 'run'}"], "num-supernodes=1", timeout=150)
        failed = False
    finally:
        link.stop(failed)
    out = capsys.readouterr().out
    assert "Successfully started run" in out
    assert "config key 'dataset.colour'" in one_error_line(out)
    assert not (tmp_path / "run").exists()
    assert not link.proc.alive()


class NodesGrid:
    """Enough of a Flower Grid for the ServerApp's node check: ``n`` registered SuperNodes."""

    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_server_app_names_the_federation_config_when_the_node_count_differs():
    rc = compose_config(["dataset=digits"])
    want = num_simulated_nodes(rc)
    assert flwr_app.check_nodes(NodesGrid(want), rc) is None
    warning = flwr_app.check_nodes(NodesGrid(want + 1), rc)
    assert f"simulates {want + 1} SuperNodes" in warning and f"num-supernodes={want} " in warning
