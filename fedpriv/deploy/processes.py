"""The processes a launcher starts: each in its own session, stopped by PID with every descendant."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from fedpriv.deploy.common import HOST
from fedpriv.proctree import descendants, pid_alive, proc_stat

__all__ = [
    "Interrupted", "Proc", "Processes", "descendants", "free_ports", "install_signal_handlers",
    "pid_alive", "port_open", "signal_group",
]


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) arrived: unwind and clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Proc:
    """A process this launcher started (the root of its own process group)."""

    name: str
    pid: int
    start: int  # /proc start time, to never signal a recycled PID
    log: str
    cmd: list[str]

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start)


class Processes:
    """The processes one launcher owns; stops them all (descendants included), once.

    An owner that starts or adopts a process is stopped at interpreter exit (the ``atexit`` hook
    is registered then, not on import).
    """

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.popens: dict[int, subprocess.Popen] = {}
        self.seen: set[int] = set()  # every PID ever seen below our roots (for checks)
        self._lock = threading.Lock()

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> Proc:
        _stop_at_exit(self)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=str(cwd), start_new_session=True,
            )
        st = proc_stat(popen.pid)
        proc = Proc(name, popen.pid, st[3] if st else 0, str(log), cmd)
        with self._lock:
            self.procs.append(proc)
            self.popens[proc.pid] = popen
        return proc

    def adopt(self, procs: Iterable[Proc]) -> None:
        """Take over processes another launcher started (``down`` after ``up``)."""
        _stop_at_exit(self)
        with self._lock:
            self.procs.extend(procs)

    def release(self) -> None:
        """Forget the processes (they keep running): ``up`` hands them to a later ``down``."""
        with self._lock:
            self.procs, self.popens = [], {}

    def returncode(self, proc: Proc) -> Optional[int]:
        popen = self.popens.get(proc.pid)
        if popen is not None:
            return popen.poll()
        return None if proc.alive() else -1

    def record_descendants(self) -> set[int]:
        found = descendants({p.pid: p.start for p in self.procs})
        self.seen |= found | {p.pid for p in self.procs}
        return found

    def stop(self, procs: Optional[list[Proc]] = None, grace: float = 15.0) -> list[str]:
        """SIGTERM every process of ``procs`` (default: all) and all their descendants, wait up to
        ``grace`` s, SIGKILL what is left. Returns the names of the roots that needed SIGKILL."""
        with self._lock:
            targets = list(procs if procs is not None else self.procs)
        roots = {p.pid: p.start for p in targets}
        live_roots = [p for p in targets if p.alive()]
        tree = descendants(roots)
        self.seen |= tree | set(roots)
        for pid in [p.pid for p in live_roots] + sorted(tree):
            _signal_pid(pid, signal.SIGTERM)
            _signal_pid(pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._reap()
            tree |= descendants(roots)
            if not any(pid_alive(p) for p in tree) and not any(p.alive() for p in live_roots):
                break
            time.sleep(0.2)
        forced = [p.name for p in live_roots if p.alive()]
        for _ in range(3):  # SIGKILL; repeat in case something spawned meanwhile
            tree |= descendants(roots)
            left = [p.pid for p in live_roots if p.alive()] + [pid for pid in tree if pid_alive(pid)]
            if not left:
                break
            for pid in left:
                _signal_pid(pid, signal.SIGKILL)
            end = time.monotonic() + 3.0
            while time.monotonic() < end and any(pid_alive(pid) for pid in left):
                self._reap()
                time.sleep(0.1)
        self._reap()
        with self._lock:
            gone = {p.pid for p in targets}
            self.procs = [p for p in self.procs if p.pid not in gone]
            for pid in gone:
                self.popens.pop(pid, None)
        return forced

    def _reap(self) -> None:
        for popen in list(self.popens.values()):
            popen.poll()


# Owners whose processes are stopped at interpreter exit; the hook is registered with the first.
_OWNED: list[Processes] = []
_OWNED_LOCK = threading.Lock()


def _stop_at_exit(owner: Processes) -> None:
    with _OWNED_LOCK:
        if not _OWNED:
            atexit.register(_cleanup_at_exit)
        if owner not in _OWNED:
            _OWNED.append(owner)


def _cleanup_at_exit() -> None:
    for owner in list(_OWNED):
        if owner.procs:
            owner.stop()


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End the process group ``proc`` leads, if still running: SIGTERM, then SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def signal_group(pid: int, sig: int, only_if_leader: bool = False) -> None:
    """Send ``sig`` to the process group ``pid`` leads (never to our own group)."""
    st = proc_stat(pid)
    if only_if_leader and (st is None or st[2] != pid):
        return
    if pid == os.getpgid(0):  # never our own group
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind the launcher (so ``finally`` blocks stop processes)."""

    fired = []

    def handler(signum: int, frame: Any) -> None:
        if fired:  # already unwinding: let the clean-up finish
            print(f"deploy: {signal.Signals(signum).name}: still stopping processes...", file=sys.stderr, flush=True)
            return
        fired.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while choosing, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0
