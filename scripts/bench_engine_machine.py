"""Facts about the machine scripts/benchmark_engine.py runs on: its load, its versions, the code's commit."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot (user .. steal, without idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[:8]) - values[3] - values[4]


def wait_for_quiet(max_wait: float, threshold: float = 0.15, window: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` of the CPUs
    over ``window`` seconds; returns the seconds waited. The machine may be shared."""
    start = time.time()
    while True:
        busy0 = machine_busy_ticks()
        time.sleep(window)
        share = (machine_busy_ticks() - busy0) / (window * CLK_TCK * (os.cpu_count() or 1))
        if share < threshold or time.time() - start >= max_wait:
            return time.time() - start



def machine_line() -> str:
    import flwr
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return (f"machine: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__} "
            f"(1 thread per process: torch.set_num_threads(1), OMP_NUM_THREADS=1), flwr {flwr.__version__}")


def code_version() -> str:
    """The commit the fedpriv figures belong to (the code changes often), and whether it is edited."""
    def git(*a: str) -> str:
        try:
            out = subprocess.run(["git", *a], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = git("status", "--porcelain", "--", "fedpriv", "clients", "strategies")
    return f"fedpriv code: commit {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        f", with uncommitted changes in {len(dirty.splitlines())} file(s) of fedpriv/ clients/ strategies/" if dirty else "")
