"""The engine issue's goals, met or missed, with the profile of each miss (used by benchmark_engine.py).

Every figure comes from the measurements of the one benchmark run (``Measured``): the per-round wall
time (median of rounds 2..N-1), round 1 from process start, and the CPU seconds of every process of
each implementation's tree. A goal missed is printed with where the time went: how much CPU the
workers and the driver burn per round against the floor's (whole run / rounds: start-up included,
so read them side by side, not as a round's own budget), which is what the closing remarks act on.
"""

from __future__ import annotations

import math

#: Ray's own processes: neither the driver nor a worker that trains clients.
RAY_SYSTEM = ("raylet", "gcs_server", "log_monitor.py", "monitor.py", "dashboard.py", "agent.py",
              "runtime_env_agent", "dashboard_agent", "ray::IDLE", "ray::DashboardAgent")


def cpu_split(m) -> tuple[float, float, float]:
    """(driver, workers, Ray system) CPU seconds over the whole run."""
    driver = workers = system = 0.0
    for name, (seconds, _count) in m.cpu.items():
        if name == "driver":
            driver += seconds
        elif any(name.startswith(s) for s in RAY_SYSTEM):
            system += seconds
        else:
            workers += seconds
    return driver, workers, system


def per_round(m, seconds: float) -> float:
    rounds = len(m.round_ends)
    return seconds / rounds if rounds else float("nan")


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
    if fed and math.isfinite(fed.round1):
        _line(fed.round1 < 5.0, "fedpriv round 1 (start-up included) under 5 s", f"{fed.round1:.1f} s")
        if fed.round1 >= 5.0:
            missed.append("round1")
    if not missed:
        return
    print("Profile of the misses (CPU seconds per round, whole run / rounds):")
    for m in (floor, fed, flower):
        if m is None:
            continue
        d, w, s = (per_round(m, x) for x in cpu_split(m))
        print(f"  {m.name:8s} driver {d:5.2f}  workers {w:5.2f}  Ray system {s:5.2f}  "
              f"(the round's wall time on {cores} cores: {cores * m.median:5.2f} core-seconds)")
    if "floor" in missed and floor and fed:
        fd, fw, fs = (per_round(fed, x) for x in cpu_split(fed))
        _, lw, _ = (per_round(floor, x) for x in cpu_split(floor))
        fl_d = per_round(floor, cpu_split(floor)[0])
        print(f"  gap {fed.median - floor.median:.2f} s/round: fedpriv's workers burn {fw / lw:.2f}x the floor's "
              f"worker CPU (Flower messages: the global model encoded, sent and decoded per share, the reply's "
              f"arrays and records), and its driver {fd:.2f} CPU-s a round against the floor's {fl_d:.2f} "
              "(reply validation, the accountant's epsilon, a durable checkpoint of the model, metrics), "
              "taken from the same 2 cores as the workers. What would close it: the driver's checkpoint and "
              "publishing overlapped with the next round's training (a writer thread), the accountant's "
              "epsilon composed incrementally, and the model shipped to a worker once per round as shared "
              "memory (Ray's object store) instead of in each message.")
    if "round1" in missed and fed:
        print("  round 1 = Hydra + imports + preflight in the launcher (~5 s on 2 cores), then Ray's start and each "
              "worker importing torch/Flower and loading its data. What would close it: a warm worker pool "
              "(a long-lived SuperLink + SuperNodes: deployment mode) or lazy imports in the worker.")
