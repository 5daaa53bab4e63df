"""Running the app on a federation with ``flwr run``: the run, its node watch, its result and report."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from fedpriv import run_folder
from fedpriv.deploy.common import DeployError, Echo, print_line
from fedpriv.deploy.diagnosis import diagnose, read_log
from fedpriv.deploy.faults import Fault, schedule_kill
from fedpriv.deploy.federation import Federation, flower_bin
from fedpriv.deploy.overrides import check_overrides, deployment_overrides, run_config_args
from fedpriv.deploy.processes import Processes, signal_group, stop_group


@dataclass
class RunResult:
    returncode: int
    run_id: Optional[int]
    run_dir: Optional[str]
    log: str
    summary: Optional[dict[str, Any]]
    rounds: list[dict[str, Any]]
    status: str = ""


_ROUND_LINE = re.compile(r"^round (\d+)/(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_COLOR = sys.stdout.isatty()
_NOISE = re.compile(r"httpx: HTTP Request|httpcore|^\s*$")


def run_app(
    fed: Federation,
    owner: Processes,
    user_overrides: list[str],
    faults: Iterable[Fault] = (),
    echo: Echo = print_line,
    timeout: Optional[float] = None,
) -> RunResult:
    """``flwr run <project> <connection> --stream``; streams the ServerApp's log, reports nodes
    that go away, injects ``kill`` faults, and reads back the run's summary.

    The run folder is the composed ``run_dir`` (the launcher's ``<session>/run-<k>`` unless the
    user's overrides name another, made absolute): the ServerApp composes the same overrides, so
    the launcher reads the results from there, never from the ServerApp's output."""
    live = len(fed.alive_nodes())
    if live == 0:
        raise DeployError("no SuperNode is connected: nothing to run")
    fed.runs += 1
    run_dir = Path(fed.session) / f"run-{fed.runs}"
    overrides = deployment_overrides(list(user_overrides), fed.num_nodes, run_dir)
    rc = check_overrides(overrides, fed.num_nodes)  # its preflight refuses a configuration without run_dir
    fed.save()
    log_path = Path(fed.session) / f"run-{fed.runs}.log"
    cmd = [flower_bin("flwr"), "run", fed.project, fed.connection, "--stream", *run_config_args(shlex.join(overrides), Path(fed.session))]
    echo("deploy: " + shlex.join(["flwr", *cmd[1:]]))
    if fed.refused or live < fed.num_nodes:
        echo(f"deploy: WARNING: {live} of {fed.num_nodes} SuperNodes are connected; the server waits round_timeout for the others, then counts them as dropped")

    kills = sorted((f for f in faults if f.kind in ("kill", "kill9")), key=lambda f: (f.after_round, f.delay))
    result = RunResult(returncode=-1, run_id=None, run_dir=str(rc.run_dir), log=str(log_path), summary=None, rounds=[])
    stop_watch = threading.Event()
    expected_exit: set[str] = set()
    watcher = threading.Thread(target=watch_nodes, args=(fed, owner, stop_watch, expected_exit, echo), daemon=True)
    proc: Optional[subprocess.Popen] = None
    timed_out = threading.Event()
    timer: Optional[threading.Timer] = None
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                env=fed.env(), cwd=fed.project, start_new_session=True, bufsize=1,
            )
            watcher.start()
            if timeout is not None:  # a stuck run ends here, not at Flower's own timeouts
                timer = threading.Timer(timeout, lambda: (timed_out.set(), signal_group(proc.pid, signal.SIGTERM)))
                timer.daemon = True
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                m = re.search(r"Successfully started run (\d+)", text)
                if m:
                    result.run_id = int(m.group(1))
                plain = _ANSI.sub("", text)
                if not _NOISE.search(plain):
                    echo(text if _COLOR else plain)
                m = _ROUND_LINE.search(plain)
                done = int(m.group(1)) if m else (0 if result.run_id is not None else -1)
                while kills and kills[0].after_round <= done:
                    f = kills.pop(0)
                    schedule_kill(fed.nodes[f.node], f, expected_exit, echo)
            result.returncode = proc.wait()
            if timed_out.is_set():
                raise DeployError(f"the run took longer than {timeout:.0f} s (log: {log_path})")
    except BaseException:
        if result.run_id is not None:
            echo(f"deploy: stopping run {result.run_id} on the SuperLink")
            try:
                fed.flwr("stop", str(result.run_id), fed.connection, timeout=20)
            except Exception:  # noqa: BLE001 - best effort while unwinding
                pass
        raise
    finally:
        stop_watch.set()
        if timer is not None:
            timer.cancel()
        if proc is not None:
            stop_group(proc)

    if result.run_id is not None:
        result.status = _run_status(fed, result.run_id)
    rd = Path(result.run_dir)
    if (rd / run_folder.SUMMARY).exists():
        result.summary = run_folder.read_summary(rd)
    result.rounds = operator_view(rd)
    return result


def operator_view(run_dir: Path) -> list[dict[str, Any]]:
    """Each round's published figures with its operator-only diagnostics (this launcher is the
    operator's tool: counts of replies and failures, round times)."""
    raw = {int(r["round"]): r for r in run_folder.read_jsonl(run_dir / run_folder.DIAGNOSTICS)}
    return [{**r, **raw.get(int(r["round"]), {})} for r in run_folder.read_metrics(run_dir)]


def watch_nodes(fed: Federation, owner: Processes, stop: threading.Event, expected: set[str], echo: Echo) -> None:
    """Every second until ``stop``: record the processes' descendants and report each SuperNode
    that exits (one line: the fault injector's doing, or why, from its log)."""
    reported: set[str] = {p.name for p in fed.nodes if not p.alive()}
    while not stop.wait(1.0):
        owner.record_descendants()
        for proc in fed.nodes:
            if proc.name not in reported and owner.returncode(proc) is not None:
                reported.add(proc.name)
                why = "killed by the fault injector" if proc.name in expected else diagnose(read_log(proc.log))
                echo(f"deploy: {proc.name} (pid {proc.pid}) left the federation: {why}; the run goes on with the others")


def _run_status(fed: Federation, run_id: int) -> str:
    try:
        res = fed.flwr("ls", fed.connection, "--run-id", str(run_id), "--format", "json", timeout=30)
        data = json.loads(res.stdout[res.stdout.find("{") :])
        runs = data.get("runs") or []
        return str(runs[0].get("status", "")) if runs else ""
    except Exception:  # noqa: BLE001 - informative only
        return ""


def report(result: RunResult, echo: Echo = print_line) -> bool:
    """Final lines: accuracy, epsilon, per-round times. True if the run completed."""
    s = result.summary
    trained_none = False
    if s is None:
        echo(f"deploy: the run wrote no summary.json (flwr run exit code {result.returncode}, status {result.status or '?'}); see {result.log}")
        return False
    if result.rounds:
        times = ", ".join(f"{r['round']}: {r['round_seconds']:.1f} s" for r in result.rounds)
        echo(f"deploy: round times: {times}")
        failed = sum(int(r.get("num_failed", 0)) for r in result.rounds)
        dropped = sum(int(r.get("num_dropped", 0)) for r in result.rounds)
        if failed or dropped:
            echo(f"deploy: client replies over the run: {failed} failed, {dropped} never came")
        if not any(int(r.get("num_clients", 0)) for r in result.rounds):
            echo("deploy: WARNING: no client update was aggregated in any round (see the failures above)")
            trained_none = True
    echo(
        f"deploy: final test accuracy {s.get('final_accuracy', float('nan')):.4f} after "
        f"{s.get('rounds_completed')}/{s.get('rounds_planned')} rounds ({s.get('stop_reason')}), run {result.run_id} {result.status}"
    )
    if "epsilon" in s:
        echo(f"deploy: central DP (user-level): epsilon {s['epsilon']:.3f} at delta {s.get('delta', float('nan')):.2e}")
    if "local_epsilon_max" in s:
        echo(f"deploy: local DP-SGD (example-level): max client epsilon {s['local_epsilon_max']:.3f} at delta {s.get('local_delta', float('nan')):.1e}")
    if "epsilon" not in s and "local_epsilon_max" not in s:
        echo(f"deploy: epsilon: none (privacy={s.get('privacy', 'none')}: no differential privacy)")
    echo(f"deploy: outputs in {result.run_dir}")
    return s.get("stop_reason") == "completed" and s.get("rounds_completed") == s.get("rounds_planned") and not trained_none

