"""The floor of scripts/benchmark_engine.py: central DP-FedAvg in pure PyTorch, two processes, no framework.

    python scripts/bench_engine_floor.py WORKLOAD_JSON RESULT_JSON

Two spawned worker processes each get half of the round's Poisson cohort and the global model
(a flat vector), train their clients one after another, clip each update to L2 norm C and return
the sum of the clipped updates; the parent adds N(0, (zC)^2) noise to the total, divides by the
expected cohort and updates the model. Each process loads the data once (memory-mapped).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine_common import (
    Workload,
    client_rows,
    clipped_update,
    dataset,
    flat_params,
    generator_for,
    load_flat,
    local_train,
    new_model,
    now,
    test_accuracy,
    write_result,
)

NUM_WORKERS = 2


def worker(conn, workload_json: str) -> None:
    """Serve rounds: (round, flat model, client ids) -> (sum of clipped updates, count, loss sum)."""
    torch.set_num_threads(1)
    w = Workload.from_json(workload_json)
    dataset(w)  # memory-map once
    model = new_model(w)
    while (job := conn.recv()) is not None:
        server_round, flat, clients = job
        start = torch.from_numpy(flat)
        total = torch.zeros(start.numel(), dtype=torch.float64)
        loss_sum = 0.0
        for c in clients:
            load_flat(model, start)
            x, y = client_rows(w, int(c))
            loss_sum += local_train(model, x, y, w, generator_for(w, server_round, int(c)))
            total += clipped_update(model, start, w.clip_norm)[0]
        conn.send((total.numpy(), len(clients), loss_sum))


def run(w: Workload, result_path: str) -> None:
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(NUM_WORKERS):
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child_end, w.to_json()), daemon=True)
        p.start()
        pipes.append(parent_end)
        procs.append(p)
    model = new_model(w)
    flat = flat_params(model).double()
    rng = np.random.default_rng()  # cohorts: Poisson, q = cohort / num_clients
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    round_ends, cohorts = [], []
    for server_round in range(1, w.rounds + 1):
        cohort = np.flatnonzero(rng.random(w.num_clients) < w.q)
        cohorts.append(len(cohort))
        model_f32 = flat.float().numpy()
        for i, conn in enumerate(pipes):
            conn.send((server_round, model_f32, cohort[i::NUM_WORKERS].tolist()))
        total = torch.zeros_like(flat)
        for conn in pipes:
            part, _, _ = conn.recv()
            total += torch.from_numpy(part)
        noise = torch.normal(0.0, w.noise_multiplier * w.clip_norm, size=flat.shape, generator=noise_gen,
                             dtype=torch.float64)
        flat = flat + (total + noise) / w.cohort
        round_ends.append(now())
    for conn in pipes:
        conn.send(None)
    for p in procs:
        p.join(timeout=10)
    load_flat(model, flat.float())
    write_result(result_path, round_ends, test_accuracy(model, w), cohorts=cohorts,
                 note="Poisson q = cohort / num_clients")


if __name__ == "__main__":
    run(Workload.from_json(sys.argv[1]), sys.argv[2])
