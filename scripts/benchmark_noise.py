"""Seconds to draw one round's central-DP noise with each Gaussian sampler (not a test).

    PYTHONPATH=. .venv/bin/python scripts/benchmark_noise.py
    PYTHONPATH=. .venv/bin/python scripts/benchmark_noise.py --repeats 5 --exact --workers 1

For d = 421,834 (the default CNN's parameter count) and d = 2,410 (a small MLP), each sampler adds
noise of std ``--std`` to a d-vector through ``add_noise`` (what a round does) ``--repeats`` times,
interleaved so machine load hits all alike; the table gives the median seconds and the ratio to
numpy. ``--exact`` adds OpenDP at its exact default grid k = -1074 (about 5x slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fedpriv.privacy.noise_samplers import NumpyGaussian, OpenDPGaussian  # noqa: E402

SIZES = {"cnn": 421_834, "mlp": 2_410}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--std", type=float, default=1.0, help="noise std of the summed update (z * C)")
    ap.add_argument("--workers", type=int, default=None, help="OpenDP threads (default: all CPUs)")
    ap.add_argument("--exact", action="store_true", help="also time OpenDP with k = -1074")
    args = ap.parse_args()

    samplers = {"numpy": NumpyGaussian(seed=None), "opendp": OpenDPGaussian(workers=args.workers)}
    if args.exact:
        samplers["opendp k=-1074"] = OpenDPGaussian(k=-1074, workers=args.workers)
    workers = samplers["opendp"].workers
    print(f"std={args.std}  repeats={args.repeats}  cpus={os.cpu_count()}  opendp workers={workers}  "
          f"opendp grid k={samplers['opendp'].grid_exponent(args.std)}")
    print(f"{'model':<5} {'d':>9}  {'sampler':<16} {'median s':>10} {'us/value':>9} {'x numpy':>9}")
    for model, d in SIZES.items():
        values = np.random.default_rng(0).normal(0.0, 0.1, size=d)  # a summed clipped update stands in
        times: dict[str, list[float]] = {name: [] for name in samplers}
        for _ in range(args.repeats):
            for name, sampler in samplers.items():
                t0 = time.perf_counter()
                sampler.add_noise(values, args.std)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["numpy"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{model:<5} {d:>9,}  {name:<16} {med:>10.4f} {med / d * 1e6:>9.3f} {med / base:>9.0f}")


if __name__ == "__main__":
    main()
