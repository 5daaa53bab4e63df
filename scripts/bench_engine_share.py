"""One worker's share of a round in one process, without Ray: fedpriv's train_share against the floor's loop.

    python scripts/bench_engine_share.py            # width 8 and 32, 25 clients, best of 5 each
    python scripts/bench_engine_share.py --width 8

The same 25 clients of scripts/benchmark_engine.py's workload (60 rows each, one epoch of SGD, batch 10,
lr 0.05, clip 1), the same model and rows: the floor's loop (bench_engine_common: local training, flat
clipped update, summed) and fedpriv's ``clients.cohort.train_share`` (what a worker runs for its share,
its reply records included), alternately, the best of ``--reps`` timings of each. It separates what
fedpriv's code costs from what its place on Ray costs: benchmark_engine.py compares whole rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench_engine_common import (  # noqa: E402
    Workload,
    client_rows,
    clipped_update,
    dataset,
    flat_params,
    generator_for,
    load_flat,
    local_train,
    new_model,
)
from flwr.app import ConfigRecord  # noqa: E402

from clients.cohort import train_share  # noqa: E402
from fedpriv import updates  # noqa: E402
from fedpriv.client_state import ClientStateStore  # noqa: E402
from fedpriv.compose import compose_jobs  # noqa: E402
from fedpriv.task import encode_config, new_model as fedpriv_model  # noqa: E402

CLIENTS = list(range(0, 50, 2))  # one worker's half of a 50-client cohort


def floor_share(w: Workload, server_round: int = 2) -> None:
    model = new_model(w)
    start = flat_params(model)
    total = torch.zeros(start.numel(), dtype=torch.float64)
    for c in CLIENTS:
        load_flat(model, start)
        x, y = client_rows(w, c)
        local_train(model, x, y, w, generator_for(w, server_round, c))
        total += clipped_update(model, start, w.clip_norm)[0]


def fedpriv_share_fn(w: Workload, state_dir: str):
    overrides = ["dataset=fashion_mnist", "partition=iid", f"num_clients={w.num_clients}", f"clients_per_round={w.cohort}",
                 "sampling=poisson", "model=cnn", f"model.width={w.width}", "privacy=central",
                 f"privacy.noise_multiplier={w.noise_multiplier}", "privacy.target_epsilon=null",
                 f"privacy.clip_norm={w.clip_norm}", f"train.batch_size={w.batch_size}", f"train.lr={w.lr}",
                 "train.momentum=0.0", f"train.local_epochs={w.local_epochs}", f"seed={w.seed}",
                 f"data.root={w.data_root}", "data.val_fraction=0.0", f"run_dir={state_dir}/run"]
    rc = compose_jobs(overrides, multirun=False)[0].config
    arrays = updates.to_record({k: v.numpy() for k, v in fedpriv_model(rc).state_dict().items()})
    cfg = ConfigRecord({"task": encode_config(rc), "server-round": 2, "client-ids": CLIENTS, "share": "clipped-sum",
                        "clip-norm": w.clip_norm, "client-state-dir": state_dir, "run-id": "bench"})
    store = ClientStateStore(state_dir)
    return lambda: train_share(rc, cfg, arrays, {}, store)


def best_of(fn, reps: int) -> float:
    fn()  # warm: data mapped, model built
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, action="append", help="CNN width (default: 8 and 32)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one share of {len(CLIENTS)} clients, one process, one torch thread; best of {args.reps}")
    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        for width in args.width or [8, 32]:
            w = Workload(width=width)
            dataset(w)
            share = fedpriv_share_fn(w, tmp)
            floor = best_of(lambda: floor_share(w), args.reps)
            fed = best_of(share, args.reps)
            print(f"width {width:2d}: floor loop {floor:.3f} s, fedpriv train_share {fed:.3f} s, "
                  f"ratio {fed / floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
