"""The same simulation through ``flwr run .`` (Flower's supported path) on a local simulation federation.

``scripts/simulate.py`` calls Flower's ``run_simulation``, which Flower 1.42 marks deprecated. Here
``flwr run <project> <connection> --stream`` starts the run on a SuperLink in simulation mode: its
SuperExec starts ``flwr-simulation``, which installs the app (a FAB built from the project) under
``$FLWR_HOME/apps`` and runs the ServerApp (:mod:`fedpriv.flwr_app`) and the ClientApp on Ray. The
ServerApp composes the run-config key ``overrides`` over ``conf/`` as ``scripts/simulate.py`` does.

    python -m fedpriv.flwr_run dataset=digits num_rounds=2 privacy=central

This launcher does what a bare ``flwr run . local ...`` leaves to the user:

* it composes and preflights the overrides here, so that a bad key is one line and exit code 2
  before anything starts (the ServerApp checks again for bare ``flwr run`` users);
* it sizes the federation as :mod:`fedpriv.simulation` does (:func:`fedpriv.flwr_app.federation_config`: one
  simulated SuperNode per worker, whole CPUs per client), and refuses in one line what Flower's
  simulation runtime cannot honour (a Ray cluster address, an object store size, CPU fractions);
* it fixes the run folder as an absolute path (the ServerApp runs in the SuperLink's working
  directory, not necessarily this one);
* it starts its own SuperLink on a free port with a private ``$FLWR_HOME`` and stops it, with every
  descendant (SuperExec, ``flwr-simulation``, Ray), when the run ends or fails. Flower's own
  ``:local:`` connection starts a detached SuperLink on fixed ports (39091) that outlives the
  command and keeps the environment of whichever ``flwr run`` started it; started here, its
  lifetime, environment and working directory are the run's.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError, RunConfig, explicit_keys
from fedpriv.data.locate import DATA_ENV, PROJECT_SHARED_DATA
from fedpriv.deploy.federation import child_env, flower_bin, write_connection
from fedpriv.deploy.overrides import run_config_args
from fedpriv.deploy.processes import (
    Interrupted,
    Processes,
    free_ports,
    install_signal_handlers,
    signal_group,
    stop_group,
)
from fedpriv.errors import UserError
from fedpriv.flwr_app import federation_config
from fedpriv.launch import fail
from fedpriv.logs import configure_logging
from fedpriv.preflight import preflight

PROJECT = Path(__file__).resolve().parents[1]
CONNECTION = "fedpriv-local-simulation"
STARTUP_TIMEOUT = 30.0  # seconds for the SuperLink to answer (Flower's own wait is 15 s)


def run_overrides(user: Sequence[str], cwd: Path) -> list[str]:
    """The user's overrides with ``run_dir`` absolute (default ``outputs/flwr/<date>/<time>`` here,
    as ``scripts/simulate.py`` writes ``outputs/<date>/<time>``)."""
    out = []
    for o in user:
        if explicit_keys([o]) == {"run_dir"} and "=" in o and o.split("=", 1)[1] not in ("", "null"):
            o = f"run_dir={(cwd / Path(o.split('=', 1)[1]).expanduser()).resolve()}"
        out.append(o)
    if "run_dir" not in explicit_keys(list(user)):
        out.append(f"run_dir={cwd.resolve() / 'outputs' / 'flwr' / time.strftime('%Y-%m-%d') / time.strftime('%H-%M-%S')}")
    return out


def check(overrides: list[str]) -> tuple[RunConfig, str, list[str]]:
    """Compose and preflight here, before anything starts: (config, federation config, warnings)."""
    rc = compose_config(overrides)
    if rc.client_mode != "virtual":
        raise ConfigError("config key 'client_mode': nodes (one SuperNode per client) is deployment; allowed here: "
                          "virtual (for deployment use scripts/deploy.py)")
    return rc, federation_config(rc), preflight(rc)


class LocalSuperLink:
    """A SuperLink in simulation mode that this launcher starts and stops, with a private ``$FLWR_HOME``."""

    def __init__(self, cwd: Path, keep_home: bool = False):
        self.home = Path(tempfile.mkdtemp(prefix="fedpriv-flwr-"))
        self.port = free_ports(1)[0]
        self.env = child_env(self.home)
        if DATA_ENV not in self.env and PROJECT_SHARED_DATA.is_dir():
            # the app runs from its FAB copy under $FLWR_HOME/apps, beside no ../shared/data
            self.env[DATA_ENV] = str(PROJECT_SHARED_DATA)
        self.env.setdefault("RAY_DEDUP_LOGS", "0")
        self.cwd, self.keep_home = cwd, keep_home
        self.owner = Processes()
        self.log = self.home / "superlink.log"
        self.proc = None

    def start(self) -> None:
        write_connection(self.home, CONNECTION, f"127.0.0.1:{self.port}", None)
        cmd = [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.home / "state.db")]
        self.proc = self.owner.start("superlink", cmd, self.log, self.env, self.cwd)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise UserError(f"flwr run: the local SuperLink exited at start; see {self.log}")
            if _healthy(self.port):
                return
            time.sleep(0.2)
        raise UserError(f"flwr run: the local SuperLink did not answer within {STARTUP_TIMEOUT:.0f} s; see {self.log}")

    def stop(self, failed: bool) -> None:
        """Stop the SuperLink and every descendant; keep ``$FLWR_HOME`` (its log) if the run failed."""
        self.owner.stop()
        if failed or self.keep_home:
            print(f"fedpriv: flwr run: Flower's logs and state are in {self.home}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(self.home, ignore_errors=True)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as res:
            return 200 <= res.status < 300
    except OSError:
        return False


def flwr_run(link: LocalSuperLink, overrides: list[str], fed_config: str, timeout: float | None = None) -> int:
    """``flwr run <project> <connection> --stream``: streams the run's log; returns its exit code.
    After ``timeout`` seconds the command is stopped and :class:`UserError` raised."""
    cmd = [flower_bin("flwr"), "run", str(PROJECT), CONNECTION, "--stream",
           *run_config_args(shlex.join(overrides), link.home), "--federation-config", fed_config]
    print("fedpriv: " + shlex.join(["flwr", *cmd[1:]]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env=link.env, cwd=str(link.cwd), start_new_session=True, bufsize=1)
    timed_out = threading.Event()
    timer = None
    if timeout is not None:  # a stalled run ends here, whether or not it prints
        timer = threading.Timer(timeout, lambda: (timed_out.set(), signal_group(proc.pid, signal.SIGTERM)))
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        seen = 0.0
        for line in proc.stdout:
            if "httpx" not in line:
                print(line, end="", flush=True)
            if time.monotonic() - seen >= 1.0:  # a /proc scan: once a second, not per log line (Ray logs a lot)
                link.owner.record_descendants()
                seen = time.monotonic()
        code = proc.wait()
        if timed_out.is_set():
            raise UserError(f"flwr run: the run took longer than {timeout:.0f} s")
        return code
    finally:
        if timer is not None:
            timer.cancel()
        stop_group(proc)


def main(argv: Sequence[str]) -> int:
    """Check, start a local SuperLink, ``flwr run``, stop it; exit code 0 if the run wrote its summary
    (the ServerApp prints the final report), 1 if not, 2 for a user error, 130 if interrupted."""
    configure_logging()
    cwd = Path.cwd()
    overrides = run_overrides(list(argv), cwd)
    try:
        rc, fed_config, warnings = check(overrides)
    except (UserError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable
    for warning in warnings:
        print(f"fedpriv: warning: {warning}", file=sys.stderr, flush=True)
    summary = Path(str(rc.run_dir)) / run_folder.SUMMARY
    if summary.exists():  # a resumed run writes its summary again (as fedpriv.simulation does)
        summary.unlink()
    install_signal_handlers()
    link = LocalSuperLink(cwd)
    failed = True
    try:
        link.start()
        flwr_run(link, overrides, fed_config)
        if not summary.exists():
            print(f"fedpriv: error: flwr run ended without {summary}; see the log above", file=sys.stderr, flush=True)
            return 1
        failed = False
        return 0
    except UserError as exc:
        print(f"fedpriv: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("fedpriv: interrupted; stopping the local SuperLink", file=sys.stderr, flush=True)
        return 130
    finally:
        link.stop(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
