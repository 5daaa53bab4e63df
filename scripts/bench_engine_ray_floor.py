"""The floor's worker loop hosted by two Ray actors against two spawned processes: Ray's own cost.

    python scripts/bench_engine_ray_floor.py            # 3 alternating pairs, 40 rounds each, width 8
    python scripts/bench_engine_ray_floor.py --pairs 5 --width 32

Both hosts run the same code (bench_engine_common's local training, clipped sum, as
bench_engine_floor.py's workers do) on the same Poisson cohorts; the driver adds the noise. Printed:
s/round over rounds 3..N and the workers' CPU milliseconds per client trained (their own
``os.times()``). Consecutive runs of one host drift on a shared machine, so the two alternate and
each pair is read side by side. It tells how much of fedpriv's gap to the floor is Ray's worker
process rather than fedpriv's code.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_engine_common import (Workload, client_rows, clipped_update, dataset, flat_params,  # noqa: E402
                                 generator_for, load_flat, local_train, new_model)


class FloorLoop:
    """One worker: the data set mapped once, one model, a share trained client after client."""

    def __init__(self, workload_json: str):
        torch.set_num_threads(1)
        self.w = Workload.from_json(workload_json)
        dataset(self.w)
        self.model = new_model(self.w)

    def share(self, server_round: int, flat: np.ndarray, clients: list[int]) -> np.ndarray:
        start = torch.from_numpy(flat)
        total = torch.zeros(start.numel(), dtype=torch.float64)
        for c in clients:
            load_flat(self.model, start)
            x, y = client_rows(self.w, c)
            local_train(self.model, x, y, self.w, generator_for(self.w, server_round, c))
            total += clipped_update(self.model, start, self.w.clip_norm)[0]
        return total.numpy()

    def cpu(self) -> float:
        t = os.times()
        return t.user + t.system


def serve(conn, workload_json: str) -> None:
    loop = FloorLoop(workload_json)
    while (job := conn.recv()) is not None:
        conn.send(loop.cpu() if job == "cpu" else loop.share(*job))


def drive(w: Workload, share, cpu) -> tuple[float, float]:
    rng, flat = np.random.default_rng(0), flat_params(new_model(w)).double()
    t0 = c0 = 0.0
    clients = 0
    for r in range(1, w.rounds + 1):
        if r == 3:
            t0, c0, clients = time.time(), cpu(), 0
        cohort = np.flatnonzero(rng.random(w.num_clients) < w.q)
        clients += len(cohort)
        total = sum(torch.from_numpy(p) for p in share(r, flat.float().numpy(), [cohort[i::2].tolist() for i in range(2)]))
        flat = flat + (total + torch.randn(flat.shape, dtype=torch.float64) * w.noise_multiplier * w.clip_norm) / w.cohort
    return (time.time() - t0) / (w.rounds - 2), 1000 * (cpu() - c0) / clients


def on_processes(w: Workload) -> tuple[float, float]:
    ctx, pipes, procs = mp.get_context("spawn"), [], []
    for _ in range(2):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=serve, args=(child, w.to_json()), daemon=True))
        procs[-1].start()
        pipes.append(parent)

    def share(r, flat, shares):
        for p, s in zip(pipes, shares):
            p.send((r, flat, s))
        return [p.recv() for p in pipes]

    def cpu():
        for p in pipes:
            p.send("cpu")
        return sum(p.recv() for p in pipes)

    try:
        return drive(w, share, cpu)
    finally:
        for p in pipes:
            p.send(None)
        for proc in procs:
            proc.join(timeout=10)


def on_ray(w: Workload) -> tuple[float, float]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        actors = [ray.remote(num_cpus=1)(FloorLoop).remote(w.to_json()) for _ in range(2)]
        return drive(w, lambda r, flat, shares: ray.get([a.share.remote(r, flat, s) for a, s in zip(actors, shares)]),
                     lambda: sum(ray.get([a.cpu.remote() for a in actors])))
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    w = Workload(rounds=args.rounds, width=args.width)
    print(f"the floor's loop, width {w.width}, {w.rounds} rounds, 2 workers; s/round (rounds 3..N), worker CPU ms a client")
    for i in range(1, args.pairs + 1):
        (ps, pc), (rs, rc) = on_processes(w), on_ray(w)
        print(f"pair {i}: processes {ps:.3f} s/round, {pc:.1f} ms | Ray actors {rs:.3f} s/round, {rc:.1f} ms "
              f"| Ray / processes: {rs / ps:.2f}x per round, {rc / pc:.2f}x CPU a client", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
