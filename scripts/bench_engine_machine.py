"""Facts about the machine scripts/benchmark_engine.py runs on: its load, its versions, the code's commit."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from fedpriv import proctree
from fedpriv.proctree import pss_kib, rss_kib, subtree

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


# ------------------------------------------------------------------------ sampling a process tree


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    return proctree.cpu_ticks(pid) or 0


def process_name(pid: int, root: int) -> str | None:
    """A short name: driver, ray::ClientAppActor, raylet, log_monitor.py, mp worker, ..."""
    if pid == root:
        return "driver"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or not argv[0]:
        return None
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    if "--multiprocessing-fork" in argv:
        return "mp worker"
    script = next((Path(a).name for a in argv[1:] if a.endswith(".py")), None)
    return script or Path(argv[0]).name


class TreeSampler:
    """Peak summed RSS / PSS of a process tree and the CPU its processes used."""

    def __init__(self, root: int):
        self.root, self.peak_rss, self.peak_pss = root, 0, 0
        self.ticks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.busy0, self.start = machine_busy_ticks(), time.time()
        self.series: list[tuple[float, dict[str, float]]] = []  # (time, CPU seconds so far by process name)
        self.own0 = cpu_ticks(os.getpid())  # this script's sampling is not "other" load

    def sample(self, with_pss: bool) -> None:
        """RSS every call; PSS only when asked (reading smaps_rollup of Ray's processes costs ~25 ms)."""
        pids = subtree(self.root)
        self.peak_rss = max(self.peak_rss, sum(rss_kib(p) for p in pids))
        if with_pss:
            self.peak_pss = max(self.peak_pss, sum(pss_kib(p) for p in pids))
        for p in pids:
            self.ticks[p] = max(self.ticks.get(p, 0), cpu_ticks(p))
            self.names[p] = process_name(p, self.root) or self.names.get(p, "?")  # Ray renames its workers
        self.series.append((time.time(), {k: s for k, (s, _) in self.cpu_by_name().items()}))

    def cpu_by_name(self) -> dict[str, tuple[float, int]]:
        """CPU seconds and process count by process name, largest first."""
        out: dict[str, tuple[float, int]] = {}
        for p, t in self.ticks.items():
            s, n = out.get(self.names.get(p, "?"), (0.0, 0))
            out[self.names.get(p, "?")] = (s + t / CLK_TCK, n + 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))

    def foreign_share(self) -> float:
        elapsed = (time.time() - self.start) * CLK_TCK * (os.cpu_count() or 1)
        own = cpu_ticks(os.getpid()) - self.own0
        other = machine_busy_ticks() - self.busy0 - sum(self.ticks.values()) - own
        return max(other, 0) / elapsed if elapsed > 0 else float("nan")
