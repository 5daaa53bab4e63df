"""Run a command and report the peak memory of its whole process tree (Ray's workers included).

    python scripts/measure_memory.py -- python scripts/simulate.py dataset=fashion_mnist num_clients=10000 clients_per_round=50

Two figures, sampled every ``--interval`` seconds from /proc (Linux):
- peak summed RSS: every process's resident set added up; pages shared between processes
  (the memory-mapped data set, shared libraries) count once per process, so this over-states;
- peak summed PSS: shared pages divided among the processes that share them (the honest total).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.proctree import pss_kib, rss_kib, subtree  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.time()
    proc = subprocess.Popen(command)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        pids = subtree(proc.pid)
        peak_rss = max(peak_rss, sum(rss_kib(p) for p in pids))
        peak_pss = max(peak_pss, sum(pss_kib(p) for p in pids))
        time.sleep(args.interval)
    wall = time.time() - start
    print(
        f"measure_memory: exit {proc.returncode}, wall {wall:.1f} s, peak process-tree RSS {peak_rss / 2**20:.2f} GiB, "
        f"peak PSS {peak_pss / 2**20:.2f} GiB",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
