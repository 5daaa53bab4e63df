"""The engine issue's goals, met or missed, with the profile of each miss (used by benchmark_engine.py).

Every figure comes from the measurements of the one benchmark run (``Measured``): the per-round wall
time (median of rounds 2..N-1), round 1 from process start, and the CPU seconds of every process of
each implementation's tree, read every ~0.25 s. A goal missed is printed with where the time went:
the CPU seconds a round of the workers (and per client trained), the driver and Ray's processes over
the same rounds 2..N-1 as the s/round figure, how busy the workers were, and what would close it.
"""

from __future__ import annotations

import math
import statistics

#: Ray's own processes: neither the driver nor a worker that trains clients.
RAY_SYSTEM = ("raylet", "gcs_server", "log_monitor.py", "monitor.py", "dashboard.py", "agent.py",
              "runtime_env_agent", "dashboard_agent", "ray::IDLE", "ray::DashboardAgent")


def group(name: str) -> str:
    """driver, workers (processes that train clients) or Ray system."""
    if name == "driver":
        return "driver"
    return "Ray system" if any(name.startswith(x) for x in RAY_SYSTEM) else "workers"


def steady_cpu(m) -> dict[str, float] | None:
    """CPU seconds a round of the driver, the workers and Ray's system processes over rounds 2..N-1
    (the s/round figure's window: start-up and the last round's evaluation left out), from the
    sampler's readings (every ~0.25 s) inside that window."""
    ends = m.round_ends
    if len(ends) < 4 or ends[0] is None or ends[-2] is None:
        return None
    inside = [(t, c) for t, c in m.cpu_series if ends[0] <= t <= ends[-2]]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (ta, ca), (tb, cb) = inside[0], inside[-1]
    per_round_share = (ends[-2] - ends[0]) / (len(ends) - 2) / (tb - ta)
    out = {"driver": 0.0, "workers": 0.0, "Ray system": 0.0}
    for name, seconds in cb.items():
        out[group(name)] += (seconds - ca.get(name, 0.0)) * per_round_share
    return out


def worker_count(m) -> int:
    """Processes that trained clients (a helper that used under a CPU-second is not one)."""
    return sum(n for name, (sec, n) in m.cpu.items() if group(name) == "workers" and sec >= 1.0)


def mean_round(m) -> tuple[float, float]:
    """(mean seconds, mean clients) of the rounds in the s/round window."""
    iv = m.intervals()
    return (sum(s for s, _ in iv) / len(iv), sum(c for _, c in iv) / len(iv)) if iv else (math.nan, math.nan)


def _line(ok: bool, goal: str, figure: str) -> None:
    print(f"  [{'met' if ok else 'MISSED':>6}] {goal}: {figure}")


def print_goals(results: list, cores: int) -> None:
    by = {m.name: m for m in results}
    floor, fed, flower = by.get("floor"), by.get("fedpriv"), by.get("flower")
    print("Goals of the engine issue (this run, this machine):")
    missed = []
    if floor and fed and math.isfinite(fed.median) and math.isfinite(floor.median):
        r = fed.median / floor.median
        _line(r <= 1.0, "fedpriv per round at most 1.0x the floor", f"{r:.2f}x ({fed.median:.2f} s vs {floor.median:.2f} s)")
        if r > 1.0:
            missed.append("floor")
    if fed and flower and math.isfinite(fed.median) and math.isfinite(flower.median):
        r, e2e = flower.median / fed.median, flower.wall / fed.wall if fed.wall else float("nan")
        _line(r >= 3.0, "fedpriv at least 3x faster than Flower's built-in DP per round", f"{r:.2f}x")
        _line(e2e >= 3.0, "... and end to end (wall clock, start-up included)", f"{e2e:.2f}x")
        if r < 3.0 or e2e < 3.0:
            missed.append("flower")
    if fed and math.isfinite(fed.round1_after_launcher):
        r1 = fed.round1_after_launcher
        _line(r1 <= 2.0, "fedpriv round 1 at most 2 s after the launcher's own start, a single run",
              f"{r1:.1f} s ({fed.round1:.1f} s from the process's start)")
        if r1 > 2.0:
            missed.append("round1")
    if fed and math.isfinite(fed.sweep_round1):
        _line(fed.sweep_round1 <= 2.0, "... a sweep's second job (-m: the workers the first job left)",
              f"{fed.sweep_round1:.2f} s")
        if fed.sweep_round1 > 2.0:
            missed.append("round1")
    if not missed:
        return
    print("Profile of the misses: CPU seconds a round over rounds 2..N-1 (the s/round window):")
    steady = {}
    for m in (floor, fed, flower):
        if m is None or (c := steady_cpu(m)) is None:
            continue
        secs, clients = mean_round(m)
        busy = c["workers"] / (worker_count(m) * secs) if worker_count(m) else math.nan
        steady[m.name] = (c, secs, clients, busy)
        print(f"  {m.name:8s} driver {c['driver']:5.3f}  workers {c['workers']:5.3f} ({1000 * c['workers'] / clients:4.1f} ms "
              f"a client; busy {busy:4.0%} of their wall)  Ray system {c['Ray system']:5.3f}  (all: "
              f"{sum(c.values()):5.3f} of the round's {cores * secs:5.3f} core-seconds on {cores} cores)")
    if "floor" in missed and "floor" in steady and "fedpriv" in steady:
        (fc, _, fcl, fbusy), (lc, _, lcl, lbusy) = steady["fedpriv"], steady["floor"]
        mid = lambda xs: statistics.median(xs[1:-1]) if len(xs) > 2 else float("nan")  # noqa: E731
        print(f"  gap {fed.median - floor.median:.2f} s/round. fedpriv's workers spend {fc['workers'] / fcl / (lc['workers'] / lcl):.2f}x "
              f"the floor's CPU a client, and are busy {fbusy:.0%} of the round against the floor's {lbusy:.0%}; "
              f"its driver and Ray's processes take {fc['driver'] + fc['Ray system']:.3f} CPU-s a round against "
              f"{lc['driver'] + lc['Ray system']:.3f}, on the same cores. Inside fedpriv's round (medians, "
              f"operator_only/diagnostics.jsonl): {mid(fed.dispatch_seconds):.3f} s from the messages' push to the last "
              f"reply, then {mid(fed.server_seconds):.3f} s of server work until the record (replies decoded and "
              f"checked, noise, the accountant's epsilon). A worker's idle time is the round's serial part: the last "
              "reply's way back through Ray and Flower's link state, the server's work, the next push and the "
              "worker's decoding of it; the floor's is a pipe send and one noise draw (~1 ms). CPU a client drifts "
              "by a third between minutes on a shared machine and Ray's worker process may cost some itself: "
              "scripts/bench_engine_ray_floor.py runs the floor's own loop in Ray actors against processes, in "
              "alternating pairs; read this gap over --passes. What would close the rest: a shorter serial part "
              "(the round's record after the next push; the model sent once to an object both workers read), "
              "workers outside Ray (deployment's SuperNodes), or a model big enough that training dominates.")
    if "round1" in missed and fed:
        print(f"  a single run's round 1 = Python + imports + Hydra ({(fed.launcher_ready or fed.t0) - fed.t0:.1f} s "
              "before the launcher's own start), then preflight, Ray's start (~4 s on 2 cores: GCS, raylet, "
              "agents) and each worker importing torch, Flower, Opacus (~3.5 s, both workers at once on 2 "
              f"cores), and the first share (engine round 1: "
              f"{fed.engine_round_seconds[0] if fed.engine_round_seconds else float('nan'):.1f} s, "
              "worker start-up included). A sweep's later jobs skip Ray's start and the workers' (they reuse "
              "them). What would close it for a single run: workers that outlive the launcher (a Ray cluster "
              "started once, `placement=cluster`, with detached warm workers), or deployment mode's long-lived "
              "SuperNodes; neither is started by a one-off launch.")
