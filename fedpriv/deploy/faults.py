"""Faults to inject (demonstrations and tests): their syntax, their checks, the mid-run kills."""

from __future__ import annotations

import re
import signal
import threading
from dataclasses import dataclass
from typing import Iterable

from fedpriv.deploy.common import DeployError, Echo
from fedpriv.deploy.processes import Proc, signal_group


@dataclass
class Fault:
    """A fault to inject (demonstrations and tests)."""

    kind: str  # no-data | bad-data | unregistered | wrong-ca | kill | kill9
    node: int
    after_round: int = 0  # kill, kill9: once this round's line is logged (0: as soon as the run starts)
    delay: float = 0.0  # kill, kill9: seconds after that

    KINDS = ("no-data", "bad-data", "unregistered", "wrong-ca", "kill", "kill9")

    @classmethod
    def parse(cls, text: str) -> "Fault":
        m = re.fullmatch(r"([a-z0-9-]+):(\d+)(?:@(\d+)(?:\+(\d+(?:\.\d+)?))?)?", text.strip())
        if not m or m.group(1) not in cls.KINDS:
            raise DeployError(f"--fault {text!r}: expected KIND:NODE or kill[9]:NODE@ROUND[+SECONDS] with KIND one of {', '.join(cls.KINDS)}")
        kind, node = m.group(1), int(m.group(2))
        if m.group(3) is not None and kind not in ("kill", "kill9"):
            raise DeployError(f"--fault {text!r}: @ROUND only applies to kill and kill9")
        return cls(kind, node, int(m.group(3) or 0), float(m.group(4) or 0.0))



def check_faults(faults: Iterable[Fault], num_nodes: int, mode: str) -> None:
    """Each fault names an existing node and suits the federation's ``mode``."""
    for f in faults:
        if not 0 <= f.node < num_nodes:
            raise DeployError(f"--fault {f.kind}:{f.node}: there are nodes 0..{num_nodes - 1} only")
        if f.kind == "unregistered" and mode != "tls+auth":
            raise DeployError("--fault unregistered needs --mode tls+auth")
        if f.kind == "wrong-ca" and mode == "insecure":
            raise DeployError("--fault wrong-ca needs --mode tls or tls+auth")


def schedule_kill(proc: Proc, fault: Fault, expected: set[str], echo: Echo) -> None:
    """Signal ``proc``'s process group (SIGTERM, or SIGKILL for ``kill9``) now or after ``fault.delay``
    seconds; its name goes into ``expected`` so its exit is reported as the fault's doing."""
    sig = signal.SIGKILL if fault.kind == "kill9" else signal.SIGTERM

    def kill() -> None:
        if not proc.alive():
            return
        expected.add(proc.name)
        echo(f"deploy: fault: {signal.Signals(sig).name} to {proc.name} (pid {proc.pid} and its process group)")
        signal_group(proc.pid, sig)

    if fault.delay > 0:
        timer = threading.Timer(fault.delay, kill)
        timer.daemon = True
        timer.start()
    else:
        kill()
