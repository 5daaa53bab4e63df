"""Tracking: wandb offline (read back from its own files, no network), mode choice, failures, progress, sweeps."""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from fedpriv.config import RunConfig, to_dict
from fedpriv.tracking import LocalFiles, make_trackers
from fedpriv.tracking.progress import RoundProgress, round_line
from fedpriv.tracking.sweep import apply_sweep_context
from fedpriv.tracking.wandb_offline import iter_payloads, read_offline_run
from fedpriv.tracking.wandb_tracker import RUN_ID_FILE, WandbTracker, resolve_mode


def _round(rnd: int, private: bool = True) -> dict:
    rec = {
        "round": rnd,
        "test_accuracy": 0.5 + 0.1 * rnd,
        "test_loss": 1.0 / rnd,
        "num_clients": 3,
        "num_sampled": 4,
        "num_failed": 0,
        "num_dropped": 1,
        "clients_declined": 0,
        "round_seconds": 0.25,
        "client_updates_per_second": 12.0,
    }
    if private:
        rec.update(epsilon=0.4 * rnd, noise_multiplier=1.1, clip_norm=1.0, clipped_fraction=0.5, planned_epsilon=0.4 * rnd)
    return rec


class Honeypot:
    """A local TCP listener that counts every connection made to it (then drops it at once)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """wandb offline, every W&B URL and HTTP(S) proxy pointed at a honeypot, wandb's dirs in tmp."""
    pot = Honeypot()
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", pot.url)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, pot.url)  # any HTTP client that tries to go out lands here
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "art")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    yield pot
    pot.close()


def _private_cfg() -> RunConfig:
    rc = RunConfig()
    rc.num_rounds = 2
    rc.privacy.mode = "central"
    rc.privacy.target_epsilon = 1.0
    rc.tracking.wandb = True
    rc.tracking.progress = False
    rc.tracking.project = "fedpriv-test"
    rc.tracking.group = "sweep-x"
    rc.tracking.tags = ["privacy.target_epsilon=1.0", "t" * 80]  # the long tag is cut to 64
    rc.tracking.log_model = True
    return rc


def test_wandb_offline_run_reads_back_without_network(tmp_path, offline_env):
    pot = offline_env
    run_dir = tmp_path / "run"
    rc = _private_cfg()
    rc.run_dir = str(run_dir)
    config = to_dict(rc)
    config["notes"] = "x" * 70_000  # a run record larger than two 32 KiB log blocks

    trackers = make_trackers(rc, run_dir)
    wb = next(t for t in trackers.trackers if isinstance(t, WandbTracker))
    trackers.start(config, resumed=False)
    assert wb.run is not None and wb.mode == "offline"
    trackers.log_round(_round(1))
    trackers.log_round(_round(2))
    (run_dir / "model.pt").write_bytes(b"\0" * 1000)
    summary = {"final_accuracy": 0.7, "final_loss": 0.5, "rounds_completed": 2, "privacy": "central", "epsilon": 0.8, "delta": 1e-5}
    trackers.log_summary(summary)
    trackers.finish()
    assert pot.connections == 0, "wandb tried to reach the network in offline mode"

    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and folders[0].name.endswith(run_id)
    run = read_offline_run(folders[0])  # complete: finish() waited for the log's exit record

    assert run.run_id == run_id
    assert run.project == "fedpriv-test" and run.group == "sweep-x"
    assert run.tags == ["privacy.target_epsilon=1.0", "t" * 64]
    # config: flat dotted keys, the large value intact across log blocks
    assert run.config["privacy.mode"] == "central"
    assert run.config["privacy.target_epsilon"] == 1.0
    assert run.config["num_rounds"] == 2
    assert run.config["model.hidden"] == [64]
    assert run.config["notes"] == "x" * 70_000
    assert not any(isinstance(v, dict) and v for v in run.config.values())
    # history: one row per round, stepped by round
    assert [h["_step"] for h in run.history] == [1, 2]
    assert [h["round"] for h in run.history] == [1, 2]
    assert run.history[0]["test_accuracy"] == pytest.approx(0.6)
    assert run.history[1]["epsilon"] == pytest.approx(0.8)
    assert run.history[1]["num_dropped"] == 1
    # summary: what log_summary sent, over the last history values
    assert run.summary["final_accuracy"] == pytest.approx(0.7)
    assert run.summary["epsilon"] == pytest.approx(0.8)
    assert run.summary["privacy"] == "central"
    assert run.summary["test_accuracy"] == pytest.approx(0.7)
    summary_file = folders[0] / "files" / "wandb-summary.json"
    if summary_file.exists():  # older wandb versions write it for offline runs; 0.31 does not
        assert json.loads(summary_file.read_text())["final_accuracy"] == pytest.approx(0.7)
    assert run.exit_code == 0
    # the model went in as an artifact record
    kinds = set()
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(sorted(folders[0].glob("*.wandb"))[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kinds.add(rec.WhichOneof("record_type"))
        if rec.WhichOneof("record_type") == "artifact":
            assert rec.artifact.type == "model" and rec.artifact.name == f"model-{run_id}"
    assert {"run", "history", "summary", "artifact", "exit"} <= kinds

    # compare.py sees the fedpriv run once (its wandb/ copy is not listed again) and reads the offline run alike
    from fedpriv.compare import find_runs

    runs, _ = find_runs([run_dir])
    assert len(runs) == 1 and runs[0].source == "fedpriv"
    (off,), _ = find_runs([folders[0]])
    assert off.source == "wandb-offline"
    assert [r["round"] for r in off.rounds] == [1, 2]
    assert off.final_accuracy == pytest.approx(0.7) and off.epsilon == pytest.approx(0.8)
    assert off.config["privacy.mode"] == "central"


def test_wandb_resume_keeps_the_run_id(tmp_path, offline_env):
    rc = _private_cfg()
    rc.tracking.log_model = False
    first = WandbTracker(rc, tmp_path)
    first.start(to_dict(rc), resumed=False)
    first.log_round(_round(1))
    first.finish()
    stored = (tmp_path / RUN_ID_FILE).read_text().strip()

    again = WandbTracker(rc, tmp_path)
    kwargs = again.init_kwargs(to_dict(rc), resumed=True, mode="offline")
    assert kwargs["id"] == stored and kwargs["resume"] == "allow"
    again.start(to_dict(rc), resumed=True)
    assert again.run is not None and again.run.id == stored
    again.log_round(_round(2))
    again.finish()
    assert offline_env.connections == 0
    folders = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert folders and all(stored in f.name for f in folders)  # same second: wandb adds "-1"
    rounds = [h["round"] for f in folders for h in read_offline_run(f).history]
    assert sorted(rounds) == [1, 2]

    fresh = WandbTracker(rc, tmp_path)
    kwargs = fresh.init_kwargs(to_dict(rc), resumed=False, mode="offline")
    assert kwargs["id"] != stored and kwargs["resume"] is None
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == kwargs["id"]


def test_mode_resolution_without_network(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))

    assert resolve_mode("auto")[0] == "offline"  # no credentials anywhere
    netrc_file.write_text("machine other.example.org login user password abc\n")
    assert resolve_mode("auto")[0] == "offline"  # credentials, but for another host
    netrc_file.write_text("machine wandb.example.org login user password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert resolve_mode("auto")[0] == "online"
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto")[0] == "online"
    assert resolve_mode("offline")[0] == "offline"
    assert resolve_mode("disabled")[0] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment's restriction wins
    assert resolve_mode("auto")[0] == "offline"
    assert resolve_mode("online")[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online")[0] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert resolve_mode("auto")[0] == "disabled"


def _fake_wandb(init):
    mod = types.ModuleType("wandb")
    mod.init = init
    mod.Settings = lambda **kw: dict(kw)
    return mod


def test_wandb_failures_only_warn(tmp_path, monkeypatch, caplog):
    for var in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def broken_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("network is down")

    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(broken_init))
    rc = _private_cfg()
    rc.tracking.mode = "online"
    t = WandbTracker(rc, tmp_path)
    with caplog.at_level("WARNING", logger="fedpriv.tracking"):
        t.start(to_dict(rc), resumed=False)
        t.log_round(_round(1))
        t.log_summary({"final_accuracy": 0.5})
        t.finish()
    assert t.run is None
    assert [c["mode"] for c in calls] == ["online", "offline"]  # online failed: one offline try
    assert calls[0]["id"] != calls[1]["id"]  # the failed attempt keeps its id busy in wandb
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == calls[1]["id"]
    assert calls[0]["settings"]["init_timeout"] > 0  # init is bounded
    assert any("network is down" in r.getMessage() for r in caplog.records)

    class FlakyRun:
        id = "abc"
        dir = str(tmp_path)

        def log(self, *a, **k):
            raise OSError("disk full")

        class summary:  # noqa: N801
            @staticmethod
            def update(d):
                raise ValueError("bad summary")

        def finish(self):
            raise RuntimeError("teardown")

    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(lambda **kw: FlakyRun()))
    t = WandbTracker(rc, tmp_path)
    t.start(to_dict(rc), resumed=False)
    t.log_round(_round(1))
    t.log_round(_round(2))
    t.log_summary({"final_accuracy": 0.5})
    t.finish()  # nothing raised


def test_disabled_mode_makes_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(lambda **kw: pytest.fail("wandb.init called")))
    rc = _private_cfg()
    rc.tracking.mode = "disabled"
    t = WandbTracker(rc, tmp_path)
    t.start(to_dict(rc), resumed=False)
    t.log_round(_round(1))
    t.finish()
    assert t.run is None and not (tmp_path / "wandb").exists()


# --- progress ---------------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_plain_lines_when_not_a_terminal():
    err, out = _Stream(False), _Stream(False)
    p = RoundProgress(2, bar_stream=err, line_stream=out)
    assert not p.use_bar and p.use_lines
    p.start({}, False)
    p.log_round(_round(1))
    p.log_round(_round(2, private=False))
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines == [round_line(2, _round(1)), round_line(2, _round(2, private=False))]
    assert lines[0].startswith("round 1/2 | acc 0.6000") and "eps 0.400" in lines[0] and "dropped 1" in lines[0]
    assert "eps" not in lines[1]
    assert err.getvalue() == ""


def test_progress_bar_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    err, out = _Stream(True), _Stream(True)
    p = RoundProgress(3, bar_stream=err, line_stream=out)
    assert p.use_bar and not p.use_lines
    p.log_round(_round(2))  # a resumed run starts at round 2
    p.log_round(_round(3))
    p.finish()
    shown = err.getvalue()
    assert "3/3" in shown and "acc 0.8000" in shown and "eps 1.200" in shown
    assert out.getvalue() == ""


def test_progress_off_and_make_trackers(tmp_path):
    rc = RunConfig()
    rc.tracking.progress = False
    kinds = [type(t) for t in make_trackers(rc, tmp_path).trackers]
    assert kinds == [LocalFiles]
    rc.tracking.progress = True
    kinds = [type(t) for t in make_trackers(rc, tmp_path).trackers]
    assert kinds == [LocalFiles, RoundProgress]


def test_round_line_handles_missing_and_infinite_values():
    line = round_line(10, {"round": 3, "test_accuracy": float("nan"), "test_loss": None, "epsilon": "inf", "round_seconds": 1})
    assert line.startswith("round  3/10") and "acc nan" in line and "loss -" in line and "eps inf" in line
    assert round_line(5, {"round": 1, "test_accuracy": math.inf, "round_seconds": 0.0}).count("|") >= 3


# --- sweeps -----------------------------------------------------------------------------------


def _hydra_cfg(sweep_dir: Path, task: list[str], num: int, multirun: bool = True):
    from hydra.types import RunMode

    return types.SimpleNamespace(
        mode=RunMode.MULTIRUN if multirun else RunMode.RUN,
        sweep=types.SimpleNamespace(dir=str(sweep_dir), subdir=str(num)),
        overrides=types.SimpleNamespace(task=task, hydra=[]),
        job=types.SimpleNamespace(num=num),
        sweeper=types.SimpleNamespace(params=None),
    )


def test_sweep_context_group_and_swept_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_dir = Path("multirun/2024-05-01/12-00-00")
    sweep_dir.mkdir(parents=True)
    # what Hydra writes before launching: the overrides as typed on the command line
    (sweep_dir / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - num_rounds=2\n    - privacy.target_epsilon=1,4\n    - tracking=wandb\n"
    )
    jobs = []
    for num, eps in enumerate(("1", "4")):
        rc = RunConfig()
        apply_sweep_context(rc, _hydra_cfg(sweep_dir, ["num_rounds=2", f"privacy.target_epsilon={eps}", "tracking=wandb"], num))
        jobs.append(rc)
    assert jobs[0].tracking.group == jobs[1].tracking.group == "multirun_2024-05-01_12-00-00"
    assert jobs[0].tracking.tags == ["privacy.target_epsilon=1"]
    assert jobs[1].tracking.tags == ["privacy.target_epsilon=4"]
    assert jobs[0].tracking.name == "privacy.target_epsilon=1"

    # without the sweep's definition every override but tracking/run_dir/resume becomes a tag
    other = tmp_path / "elsewhere"
    rc = RunConfig()
    rc.tracking.tags = ["mine"]
    rc.tracking.group = "kept"
    apply_sweep_context(rc, _hydra_cfg(other, ["num_rounds=2", "partition.alpha=0.1", "tracking.mode=offline", "resume=true"], 0))
    assert rc.tracking.group == "kept"
    assert rc.tracking.tags == ["mine", "num_rounds=2", "partition.alpha=0.1"]

    # a single run is left alone
    rc = RunConfig()
    apply_sweep_context(rc, _hydra_cfg(sweep_dir, ["num_rounds=2"], 0, multirun=False))
    assert rc.tracking.group is None and rc.tracking.tags == [] and rc.tracking.name is None


def test_online_wandb_does_not_upload_the_operators_console_of_a_private_run():
    """The console shows operator-only counts and names failed clients: no capture when private."""
    import wandb

    from fedpriv.tracking.wandb_tracker import _settings

    assert _settings(wandb, "online", capture_console=False).console == "off"
    assert _settings(wandb, "online", capture_console=True).console != "off"
