"""End to end: scripts/simulate.py on Flower's simulation engine, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpriv import fault_gate, run_folder

ROOT = Path(__file__).resolve().parents[1]
SIMULATE = [sys.executable, str(ROOT / "scripts" / "simulate.py")]
FAST = ["num_clients=6", "clients_per_round=3", "tracking.progress=false"]


def simulate(*overrides: str, env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [*SIMULATE, *overrides], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def kill_after_rounds(rounds: int, *overrides: str, timeout: float = 400) -> subprocess.Popen:
    """Start a simulation in its own session and SIGKILL the whole session (Ray included) while
    round ``rounds + 1`` is held mid-task at the fault gate (:mod:`fedpriv.fault_gate`): a crash no
    handler can soften, after exactly ``rounds`` finished rounds on any machine."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")))
    gate = run_dir.parent / f"{run_dir.name}.gate"
    gate.mkdir(parents=True)
    proc = subprocess.Popen([*SIMULATE, *overrides], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT), fault_gate.ENV: f"{gate}:{rounds + 1}"},
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not any(gate.glob("busy.*")):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its gated round"
    assert any(gate.glob("busy.*")), f"round {rounds + 1} never reached the gate within {timeout:g} s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Each kind of refusal once through the real command line (Hydra, the schema, the data, the GPU
# check, the run folder, the privacy plan, the cluster); the other cases of a kind are checked in
# this process (the same compose and preflight, minus a 3-4 s interpreter start each).
CLI = "cli"
IN_PROCESS = "in-process"


@pytest.mark.parametrize(
    "how, overrides, env, expected",
    [
        (CLI, ["+dataset.colour=red"], {}, "dataset.colour"),
        (IN_PROCESS, ["dataset.colour=red"], {}, "config key 'dataset.colour': no such key"),  # Hydra's own error
        (CLI, ["train.lr=inf"], {}, "config key 'train.lr': got inf"),
        (IN_PROCESS, ["privacy=central", "privacy.mode=none"], {}, "contradicts privacy=central"),
        (IN_PROCESS, ["data.root=NOWHERE"], {}, "config key 'data.root'"),  # an explicit folder that does not exist
        (IN_PROCESS, ["num_clients=5", "clients_per_round=9"], {}, "clients_per_round"),
        (CLI, ["placement=gpu"], {"CUDA_VISIBLE_DEVICES": ""}, "placement"),
        (CLI, ["dataset=fashion_mnist", "data.root=BROKEN"], {}, "train-images-idx3-ubyte"),
        (IN_PROCESS, ["resume=true", "run_dir=NOWHERE"], {}, "cannot resume: run folder"),
        (CLI, ["resume=true", "run_dir=BROKEN"], {}, "is not a run folder"),
        (CLI, ["privacy=central", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=0.1"], {}, "spent before round 1"),
        # a client larger than the machine: refused before Ray (which would idle round_timeout every round)
        (IN_PROCESS, [f"placement.num_cpus_per_client={max(4, (os.cpu_count() or 1) + 1)}"], {},
         "placement.num_cpus_per_client"),
        (IN_PROCESS, ["placement=cluster"], {}, "HOST:PORT"),  # never "whatever cluster runs here"
        (IN_PROCESS, ["placement=cluster", "placement.address=auto"], {}, "HOST:PORT"),
        (CLI, ["placement=cluster", "placement.address=127.0.0.1:SILENT"], {}, "no Ray head answers"),
    ],
)
def test_bad_input_stops_before_any_work_with_one_line(tmp_path, monkeypatch, how, overrides, env, expected):
    broken = tmp_path / "broken" / "fashion-mnist"  # data.root is searched first: a truncated file there
    broken.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (broken / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 10)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        silent = str(s.getsockname()[1])
    overrides = [o.replace("BROKEN", str(broken)).replace("NOWHERE", str(tmp_path / "typo")).replace("SILENT", silent)
                 for o in overrides]
    env = {"FEDPRIV_CACHE": str(tmp_path / "cache"), **env}  # no decoded copy from an earlier run
    if how == IN_PROCESS:  # what scripts/simulate.py runs before Ray: compose every job, then preflight
        from fedpriv.compose import compose_config
        from fedpriv.errors import UserError
        from fedpriv.launch import preflight

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(UserError) as refused:
            preflight(compose_config([*overrides, f"run_dir={tmp_path / 'run'}"] if "resume=true" not in overrides
                                     else overrides))
        assert expected in str(refused.value) and "\n" not in str(refused.value)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        return
    result = simulate(*overrides, f"hydra.run.dir={tmp_path}", env=env, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedpriv: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert expected in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # no round ran


@pytest.mark.slow
def test_run_writes_outputs_and_resumes_after_a_crash(tmp_path):
    run_dir = tmp_path / "run"
    killed = kill_after_rounds(2, *FAST, "num_rounds=3", f"hydra.run.dir={run_dir}")
    assert killed.returncode == -signal.SIGKILL
    rounds = [r["round"] for r in run_folder.read_jsonl(run_dir / "metrics.jsonl")]  # a torn last line is dropped
    assert rounds == [1, 2]  # every published round was kept, the one in flight never published
    assert (run_dir / "checkpoint.pt").exists()

    resumed = simulate(*FAST, "num_rounds=3", "resume=true", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra2'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in metrics] == [1, 2, 3]  # round 3 added, none redone
    for r in metrics:
        for key in ("test_accuracy", "test_loss", "num_clients", "round_seconds"):
            assert key in r
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["dataset"] == "digits" and summary["num_clients"] == 6
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and summary["wall_seconds"] > 0
    assert (run_dir / "model.pt").exists() and (run_dir / "config.yaml").exists()

    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    changed = simulate(*FAST, "num_rounds=3", "seed=5", "resume=true", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'h3'}", timeout=120)
    assert changed.returncode == 2  # a different run cannot resume this one: one line, folder untouched
    errors = [ln for ln in changed.stderr.splitlines() if ln.startswith("fedpriv: error:")]
    assert len(errors) == 1 and "seed" in errors[0] and "Traceback" not in changed.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_multirun_jobs_keep_separate_outputs(tmp_path):
    result = simulate("-m", *FAST, "num_rounds=1", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    configs = [json.loads(p.read_text()) for p in summaries]
    assert all(c["rounds_completed"] == 1 for c in configs)
    assert sorted(p.parent.name.rsplit(",", 1)[-1] for p in summaries) == ["seed=0", "seed=1"]


def processes_with_marker(marker: str) -> list[int]:
    """PIDs whose environment holds ``marker`` (a launcher's Ray processes inherit its environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_a_sweeps_jobs_share_warm_workers_while_the_placement_matches(tmp_path):
    """Jobs run in order (2 CPUs, seed 0), (2, 1), (1, 0), (1, 1): the second and fourth take over the
    workers the job before left; the third, on another Ray, stops them first; nothing of Ray outlives
    the sweep."""
    marker = f"FEDPRIV_TEST_SWEEP_{os.getpid()}_{tmp_path.name}"
    result = simulate("-m", *FAST, "num_rounds=2", "placement.num_cpus=2,1", "seed=0,1", f"hydra.sweep.dir={tmp_path}",
                      env={marker: "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((p for p in tmp_path.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_", 1)[0]))
    assert len(jobs) == 4 and all(read_jsonl(j / run_folder.METRICS)[-1]["round"] == 2 for j in jobs)
    logs = [(j / "simulate.log").read_text() for j in jobs]
    took = ["took over" in log for log in logs]
    stopped = ["stopping the previous job's Ray" in log for log in logs]
    assert took == [False, True, False, True], [log[-1500:] for log in logs]
    assert stopped == [False, False, True, False]
    assert "took over 2 warm client worker(s)" in logs[1] and "took over 1 warm client worker(s)" in logs[3]
    deadline = time.monotonic() + 30
    while processes_with_marker(marker) and time.monotonic() < deadline:  # Ray's exit hook may still be stopping
        time.sleep(0.5)
    assert processes_with_marker(marker) == []
