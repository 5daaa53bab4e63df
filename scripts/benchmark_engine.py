"""Benchmark: one round of cross-device central DP-FedAvg, three implementations, the same work.

    python scripts/benchmark_engine.py             # 30 rounds each (several minutes on 2 cores)
    python scripts/benchmark_engine.py --quick     # 5 rounds each: a smoke run
    python scripts/benchmark_engine.py --only floor,fedpriv --rounds 10 --width 8
    python scripts/benchmark_engine.py --width 8 --passes 2   # each implementation twice, in turn

The workload: Fashion-MNIST, 1,000 IID clients of 60 training rows each, an expected 50 a round,
one local epoch of plain SGD (batch 10, lr 0.05), each client's update clipped to L2 norm 1,
Gaussian noise of std z*C (z = 1) on the unweighted sum, divided by the expected cohort 50;
fedpriv's GroupNorm CNN (``fedpriv.models.build_model("cnn", width=...)``: no width gives ~114k
parameters, GroupNorm(8) needs a multiple of 8: width 8 has 103,066, the default 32 has 421,834);
evaluation on the test split only after the last round.

1. floor: pure PyTorch, a parent and two worker processes (scripts/bench_engine_floor.py);
   Poisson sampling, q = 0.05;
2. fedpriv: ``scripts/simulate.py ... privacy=central`` on Flower's Ray engine (Poisson, q = 0.05);
3. flower: Flower's FedAvg wrapped by ``DifferentialPrivacyServerSideFixedClipping`` on Ray,
   one SuperNode per client (scripts/bench_engine_flower.py); exactly 50 sampled a round.

Each implementation runs as its own child process; every ``--interval`` seconds this script sums
the RSS (and PSS) of the child's whole process tree (Ray's raylet, GCS and workers included;
fedpriv.proctree.subtree, as scripts/measure_memory.py does), and the CPU seconds of each of its
processes. Rounds are timed by wall clock between round ends: "s/round" is the median of rounds
2..N-1 and "ms/client" their total over the clients they trained (round N is left out for all
three because fedpriv's last round holds its final evaluation); "round 1" runs from the child's
start, start-up included. fedpriv's round ends are the moments its
``operator_only/diagnostics.jsonl`` gains a line; its own ``round_seconds`` (from sampling to the
round's record, without the checkpoint and the publishing) are printed too. The machine may be
shared: the share of its CPU that other processes used during each run is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_engine_common import Workload, num_parameters
from bench_engine_goals import print_goals
from bench_engine_machine import CLK_TCK, TreeSampler, code_version, cpu_ticks, machine_line, wait_for_quiet  # noqa: F401 (benchmark_fleet imports them from here)

from fedpriv.run_folder import DIAGNOSTICS, read_jsonl, read_summary

IMPLEMENTATIONS = ("floor", "fedpriv", "flower")
LABELS = {"floor": "floor (2 procs)", "fedpriv": "fedpriv", "flower": "flower built-in DP"}
# PSS only on every 40th memory sample (every ~10 s): reading a process's smaps_rollup walks its whole
# address space under its memory lock, and Ray's processes map the object store; sampled every 2 s it
# slowed fedpriv's rounds by ~20% (0.66 vs 0.54 s a round, width 8), i.e. the measurement moved the figure.
PSS_EVERY = 40


@dataclass
class Measured:
    """What one implementation's run gave."""

    name: str
    t0: float  # wall time just before the child started
    round_ends: list = field(default_factory=list)  # absolute times; None where unknown
    cohorts: list = field(default_factory=list)  # clients trained per round
    accuracy: float = float("nan")
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    wall: float = 0.0
    foreign_cpu: float = 0.0  # share of the machine's CPU used by other processes meanwhile
    returncode: int = 0
    cpu: dict = field(default_factory=dict)  # process name -> (CPU seconds, processes)
    cpu_series: list = field(default_factory=list)  # (time, {process name: CPU seconds so far}) per sample
    engine_round_seconds: list = field(default_factory=list)  # fedpriv's own round_seconds
    notes: list = field(default_factory=list)
    launcher_ready: float | None = None  # fedpriv: when Hydra wrote the job's .hydra/config.yaml (its own start done)
    sweep_round1: float = float("nan")  # fedpriv: round 1 of a sweep's second job, from that job's start
    dispatch_seconds: list = field(default_factory=list)  # fedpriv: push to last reply, per round
    server_seconds: list = field(default_factory=list)  # fedpriv: last reply to the record, per round

    @property
    def round1_after_launcher(self) -> float:
        """Round 1's end from the moment the launcher had started (imports, Hydra's composition done)."""
        if self.launcher_ready is None or not self.round_ends or self.round_ends[0] is None:
            return float("nan")
        return self.round_ends[0] - self.launcher_ready

    @property
    def round1(self) -> float:
        return self.round_ends[0] - self.t0 if self.round_ends and self.round_ends[0] else float("nan")

    def intervals(self) -> list[tuple[float, int]]:
        """(seconds, clients) of rounds 2..N-1 whose both ends are known: not round 1 (start-up), nor
        round N (fedpriv's last round includes its final evaluation, so the last is left out for all)."""
        out = []
        for i in range(1, len(self.round_ends) - 1):
            a, b = self.round_ends[i - 1], self.round_ends[i]
            if a is not None and b is not None:
                out.append((b - a, self.cohorts[i] if i < len(self.cohorts) else 0))
        return out

    @property
    def median(self) -> float:
        iv = self.intervals()
        return statistics.median(s for s, _ in iv) if iv else float("nan")

    @property
    def ms_per_client(self) -> float:
        iv = self.intervals()
        clients = sum(c for _, c in iv)
        return 1000 * sum(s for s, _ in iv) / clients if clients else float("nan")


class LineWatcher:
    """When each line of a JSON-lines file appeared (the file's mtime when one new line is seen)."""

    def __init__(self, path: Path):
        self.path, self.size, self.times = path, -1, []

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            return
        if st.st_size == self.size:
            return
        self.size = st.st_size
        lines = self.path.read_bytes().count(b"\n")
        new = lines - len(self.times)
        if new > 0:  # several new lines at once: only the last one's time is known
            self.times += [None] * (new - 1) + [st.st_mtime]


def run_child(name: str, command: list[str], log_path: Path, interval: float, watch: Path | None = None) -> tuple[Measured, LineWatcher | None]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    m, cpu0 = Measured(name, time.time()), time.process_time()
    watcher = LineWatcher(watch) if watch is not None else None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler, next_sample, samples = TreeSampler(proc.pid), 0.0, 0
        while proc.poll() is None:
            if watcher is not None:
                watcher.poll()
            if time.time() >= next_sample:
                sampler.sample(with_pss=samples % PSS_EVERY == 0)
                samples += 1
                next_sample = time.time() + interval
            time.sleep(0.02)
        if watcher is not None:
            watcher.poll()
    m.wall, m.returncode = time.time() - m.t0, proc.returncode
    m.peak_rss_kib, m.peak_pss_kib, m.foreign_cpu = sampler.peak_rss, sampler.peak_pss, sampler.foreign_share()
    m.cpu, m.cpu_series = sampler.cpu_by_name(), sampler.series
    m.notes.append(f"this script's sampling used {(time.process_time() - cpu0) / m.wall:.1%} of a core")
    if proc.returncode != 0:
        print(f"  {name}: exit {proc.returncode}; last lines of {log_path}:\n" + "".join(log_path.read_text().splitlines(True)[-15:]))
    return m, watcher


# ------------------------------------------------------------------------------ the three runs


def run_script_impl(name: str, w: Workload, tmp: Path, args: argparse.Namespace) -> Measured:
    """floor or flower: a script that writes its round ends and accuracy to a JSON file."""
    result = tmp / f"{name}.json"
    command = [sys.executable, str(HERE / f"bench_engine_{name}.py"), w.to_json(), str(result)]
    if name == "flower":
        command.append(str(args.nodes))
    m, _ = run_child(name, command, tmp / f"{name}.log", args.interval)
    if result.exists():
        data = json.loads(result.read_text())
        m.round_ends, m.accuracy = data["round_ends"], data["accuracy"]
        m.cohorts = data.get("cohorts") or [w.cohort] * len(m.round_ends)
        m.notes.append(data.get("note", ""))
    return m


def fedpriv_command(w: Workload, run_dir: Path) -> list[str]:
    n = w.rounds
    return [
        sys.executable, str(HERE / "simulate.py"), "dataset=fashion_mnist", "partition=iid",
        f"num_clients={w.num_clients}", f"clients_per_round={w.cohort}", f"num_rounds={n}", "sampling=poisson",
        "model=cnn", f"model.width={w.width}", "privacy=central", f"privacy.noise_multiplier={w.noise_multiplier}",
        "privacy.target_epsilon=null", f"privacy.clip_norm={w.clip_norm}", f"train.batch_size={w.batch_size}",
        f"train.lr={w.lr}", f"train.local_epochs={w.local_epochs}", "train.momentum=0.0", f"seed={w.seed}",
        f"data.root={w.data_root}", "data.val_fraction=0.0", "tracking.progress=false", f"eval.every={n}",
        "placement=cpu", f"hydra.run.dir={run_dir}",
    ]


def job_start(job_dir: Path) -> float | None:
    """When Hydra wrote the job's config (it does so once the launcher has started, just before the job)."""
    try:
        return (job_dir / ".hydra" / "config.yaml").stat().st_mtime
    except OSError:
        return None


def sweep_round1(w: Workload, tmp: Path, args: argparse.Namespace) -> float:
    """Round 1 of the second job of a two-job sweep (``-m seed=0,1``, 3 rounds each), from that job's
    start: the job runs on the Ray and warm workers the first job left (fedpriv.worker_pool)."""
    sweep = Path(tempfile.mkdtemp(prefix="fedpriv_sweep_", dir=tmp))
    command = [a for a in fedpriv_command(replace(w, rounds=3), sweep / "unused") if not a.startswith(("hydra.run", "seed="))]
    command[2:2] = ["-m"]
    command += ["seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}"]
    _, watcher = run_child("fedpriv", command, tmp / "fedpriv_sweep.log", args.interval, watch=sweep / "job1" / DIAGNOSTICS)
    start = job_start(sweep / "job1")
    if watcher is None or not watcher.times or watcher.times[0] is None or start is None:
        return float("nan")
    return watcher.times[0] - start


def run_fedpriv(w: Workload, tmp: Path, args: argparse.Namespace) -> Measured:
    run_dir = Path(tempfile.mkdtemp(prefix="fedpriv_run_", dir=tmp))
    m, watcher = run_child("fedpriv", fedpriv_command(w, run_dir), tmp / "fedpriv.log", args.interval,
                           watch=run_dir / DIAGNOSTICS)
    m.launcher_ready = job_start(run_dir)
    records = read_jsonl(run_dir / DIAGNOSTICS)
    m.round_ends = (watcher.times if watcher else [])[: len(records)]
    m.cohorts = [int(r.get("num_clients", 0)) for r in records]
    m.engine_round_seconds = [float(r["round_seconds"]) for r in records]
    m.dispatch_seconds = [float(r.get("dispatch_seconds", math.nan)) for r in records]
    m.server_seconds = [float(r.get("server_seconds", math.nan)) for r in records]
    if (run_dir / "summary.json").exists():
        m.accuracy = float(read_summary(run_dir)["final_accuracy"])
    if not args.no_sweep:
        m.sweep_round1 = sweep_round1(w, tmp, args)
    m.notes.append(f"round 1 after the launcher's own start: {m.round1_after_launcher:.2f} s (a single run), "
                   f"{m.sweep_round1:.2f} s (a sweep's second job)")
    m.notes.append(f"Poisson q = {w.q:g}; engine round_seconds (no checkpoint/publish), median of rounds 2..N-1: "
                   f"{statistics.median(m.engine_round_seconds[1:-1] or [float('nan')]):.2f} s; run folder {run_dir}")
    return m


# ----------------------------------------------------------------------------------- reporting


def print_table(results: list[Measured]) -> None:
    floor = next((m for m in results if m.name == "floor"), None)

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f}" if b and math.isfinite(a) and math.isfinite(b) else "-"

    head = (f"{'implementation':<20}{'s/round (median)':>17}{'round 1 s':>11}{'ms/client':>11}{'peak tree RSS GiB':>19}"
            f"{'(PSS*)':>8}  x floor: {'s/rnd':>5}{'rnd 1':>6}{'ms/cl':>6}{'RSS':>5}{'test acc':>10}{'other procs':>12}")
    print(head)
    print("-" * len(head))
    for m in results:
        rss, pss = m.peak_rss_kib / 2**20, m.peak_pss_kib / 2**20
        f_rss = floor.peak_rss_kib / 2**20 if floor else None
        print(f"{LABELS[m.name]:<20}{m.median:>17.2f}{m.round1:>11.2f}{m.ms_per_client:>11.1f}{rss:>19.2f}{pss:>7.2f}"
              f"{'':12}{ratio(m.median, floor and floor.median):>5}{ratio(m.round1, floor and floor.round1):>6}"
              f"{ratio(m.ms_per_client, floor and floor.ms_per_client):>6}{ratio(rss, f_rss):>5}"
              f"{m.accuracy:>10.4f}{m.foreign_cpu:>11.0%}")
    print("s/round: median wall seconds of rounds 2..N-1; ms/client: their total / clients they trained; round 1: from "
          "process start. RSS sums every process of the tree (shared pages once per process); *PSS: shared pages "
          "split, sampled every ~10 s. other procs: share of the machine's CPU used outside this benchmark meanwhile.")
    print()
    for m in results:
        rounds = len(m.round_ends)
        cohort = f"clients/round {min(m.cohorts)}..{max(m.cohorts)} (mean {statistics.mean(m.cohorts):.1f})" if m.cohorts else ""
        top = ", ".join(f"{k} {s:.1f}" + (f" ({n})" if n > 1 else "") for k, (s, n) in list(m.cpu.items())[:6])
        print(f"{LABELS[m.name]}: CPU seconds by process over the whole run: {top}")
        print(f"{LABELS[m.name]}: {rounds} rounds timed, {len(m.intervals())} intervals, {cohort}, wall {m.wall:.1f} s"
              + "".join(f"; {n}" for n in m.notes if n))


def check_trained(results: list[Measured]) -> bool:
    ok = True
    for m in results:
        if m.returncode != 0 or not m.accuracy > 0.15:  # chance is 0.10 on 10 classes
            print(f"WARNING: {LABELS[m.name]} did not train (exit {m.returncode}, test accuracy {m.accuracy})")
            ok = False
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 rounds: a smoke run")
    parser.add_argument("--width", type=int, default=32, help="CNN width (32: default CNN, 422k params; 8: 103k)")
    parser.add_argument("--nodes", type=int, default=1000,
                        help="Flower SuperNodes, node i acting as client i (fewer: only clients 0..nodes-1 exist)")
    parser.add_argument("--only", default=",".join(IMPLEMENTATIONS), help="comma-separated subset, in this order")
    parser.add_argument("--interval", type=float, default=0.25,
                        help=f"seconds between RSS samples (PSS: every {PSS_EVERY}th)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="before each run, wait at most this long for other processes to go quiet")
    parser.add_argument("--passes", type=int, default=1,
                        help="run the implementations this many times in turn (the machine drifts: compare within a pass)")
    parser.add_argument("--no-sweep", action="store_true", help="skip fedpriv's two-job sweep (round 1 of a warm job)")
    parser.add_argument("--workdir", default=None, help="keep logs and run folders here (default: a temp folder)")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    if rounds < 3:
        parser.error("--rounds must be at least 3 (rounds 1 and N are left out of the median)")
    w = Workload(rounds=rounds, width=args.width)
    if not w.cohort <= args.nodes <= w.num_clients:
        parser.error(f"--nodes must be between the cohort ({w.cohort}) and the clients ({w.num_clients})")
    chosen = [n for n in args.only.split(",") if n]
    unknown = set(chosen) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementation(s) {sorted(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-engine-"))
    tmp.mkdir(parents=True, exist_ok=True)

    print(machine_line())
    print(code_version())
    print(f"workload: Fashion-MNIST, {w.num_clients} IID clients x 60 training rows, expected cohort {w.cohort} "
          f"(q = {w.q:g}), {w.rounds} rounds, {w.local_epochs} local epoch of SGD (batch {w.batch_size}, lr {w.lr}, "
          f"no momentum), clip C = {w.clip_norm}, noise std z*C with z = {w.noise_multiplier} on the unweighted sum, "
          f"/ {w.cohort}; model fedpriv cnn width {w.width} ({num_parameters(w):,} parameters); "
          f"test accuracy after the last round only; Flower: {args.nodes} SuperNodes, 2 Ray actors (num_cpus=1)")
    print(f"logs and run folders: {tmp}", flush=True)
    ok = True
    for p in range(1, max(args.passes, 1) + 1):
        results = []
        for name in chosen:
            waited = wait_for_quiet(args.settle)
            print(f"pass {p}: running {name} (after waiting {waited:.0f} s for a quiet machine) ...", flush=True)
            one = args if p == 1 else argparse.Namespace(**{**vars(args), "no_sweep": True})  # the sweep: pass 1 only
            m = run_fedpriv(w, tmp, one) if name == "fedpriv" else run_script_impl(name, w, tmp, one)
            print(f"  {name}: wall {m.wall:.1f} s, {len(m.round_ends)} rounds, test accuracy {m.accuracy:.4f}", flush=True)
            results.append(m)
        print(f"\n===== pass {p} of {args.passes}")
        print_table(results)
        print()
        print_goals(results, os.cpu_count() or 1)
        ok = check_trained(results) and ok
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
