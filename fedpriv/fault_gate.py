"""A test-only gate that holds a client task at a known point, so a fault test decides *when* a
fault lands instead of racing the clock.

Off unless the environment names a folder: ``FEDPRIV_FAULT_GATE=<folder>:<round>``. Then every
training task of that server round, as it starts, writes ``<folder>/busy.<pid>`` (the worker is
provably mid-task) and waits until ``<folder>/open`` exists; a test kills, stops or interrupts that
worker, then creates ``open`` to let the others go on. Every other round, and every run without the
variable, passes straight through: the production path is the one users run. The wait is bounded
(:data:`MAX_WAIT` seconds) so a test that forgets to open the gate cannot hang a worker forever.

Ray's local workers inherit the launcher's environment, so setting the variable for
``scripts/simulate.py`` reaches them. It carries no privacy meaning: nothing about what a client
computes or sends changes, only when it starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FEDPRIV_FAULT_GATE"
MAX_WAIT = 600.0
POLL = 0.01


def parse(value: str) -> tuple[Path, int]:
    """``"<folder>:<round>"`` -> (folder, round)."""
    folder, _, round_text = value.rpartition(":")
    if not folder or not round_text.isdigit():
        raise ValueError(f"{ENV} must be <folder>:<round>, got {value!r}")
    return Path(folder), int(round_text)


def hold(server_round: int) -> None:
    """Wait at the gate if a test set one for ``server_round``; return at once otherwise."""
    value = os.environ.get(ENV)
    if not value:
        return
    folder, gated_round = parse(value)
    if server_round != gated_round:
        return
    marker = folder / f"busy.{os.getpid()}"
    partial = folder / f".busy.{os.getpid()}.partial"  # renamed into place: a watcher never reads it half-written
    partial.write_text(str(server_round))
    partial.replace(marker)
    deadline = time.monotonic() + MAX_WAIT
    while not (folder / "open").exists() and time.monotonic() < deadline:
        time.sleep(POLL)
