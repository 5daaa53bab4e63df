"""Measure a privacy-utility frontier: every point of a study, over several seeds, one run at a time.

    python scripts/frontier.py fmnist                  # all points, seeds 1 2 3, into frontier/fmnist/
    python scripts/frontier.py fmnist --only nonprivate gaussian_eps2 --seeds 1
    python scripts/frontier.py fmnist --dry-run        # the commands, checked, nothing run
    python scripts/compare.py frontier/fmnist          # tables (mean, spread, gap) and the frontier plot

Each point is ``scripts/simulate.py experiment=<preset> <its overrides> seed=<k>`` in its own folder
``<out>/<study>/<point>/seed<k>``. A finished run (summary.json) is skipped, an interrupted one
(checkpoint.pt) resumed with ``resume=true``, so the study can be stopped and started again at will:
on a shared 2-core machine these runs take hours. Every point's configuration is composed and
checked before the first run starts (one ``fedpriv: error:`` line otherwise).

Every private point and its non-private twin share the rounds, the population and the expected
cohort: only the privacy keys differ (and ``sampling=cyclic`` for tree / BandMF, which need it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.errors import UserError  # noqa: E402

_CENTRAL = ["privacy=central", "privacy.delta=1e-5"]
_BANDMF = [*_CENTRAL, "sampling=cyclic", "cyclic_groups=2", "privacy.mechanism=bandmf", "privacy.clipping=fixed",
           "privacy.clip_norm=0.4"]
_TREE = [*_CENTRAL, "sampling=cyclic", "privacy.mechanism=tree", "privacy.clipping=fixed", "privacy.clip_norm=0.4"]

#: study -> (preset, {point: overrides}). Adaptive clipping is the preset's; tree / BandMF need fixed
#: clipping, at the norm adaptive clipping settles near in these runs (privacy.json's clipping.final_norm).
STUDIES: dict[str, tuple[str, dict[str, list[str]]]] = {
    "fmnist": ("frontier_fmnist", {
        "nonprivate": ["privacy=none"],
        "gaussian_eps1": [*_CENTRAL, "privacy.target_epsilon=1"],
        "gaussian_eps2": [*_CENTRAL, "privacy.target_epsilon=2"],
        "gaussian_eps4": [*_CENTRAL, "privacy.target_epsilon=4"],
        "gaussian_eps8": [*_CENTRAL, "privacy.target_epsilon=8"],
        "bandmf_eps1": [*_BANDMF, "privacy.target_epsilon=1"],
        "bandmf_eps2": [*_BANDMF, "privacy.target_epsilon=2"],
        "tree_eps1": [*_TREE, "privacy.target_epsilon=1"],
        "tree_eps2": [*_TREE, "privacy.target_epsilon=2"],
    }),
    # The same recipe with twice the population and cohort (5 images a client): the gap against population.
    "fmnist_12k": ("frontier_fmnist", {
        "nonprivate": ["privacy=none", "num_clients=12000", "clients_per_round=1200"],
        "gaussian_eps1": [*_CENTRAL, "privacy.target_epsilon=1", "num_clients=12000", "clients_per_round=1200"],
        "gaussian_eps2": [*_CENTRAL, "privacy.target_epsilon=2", "num_clients=12000", "clients_per_round=1200"],
    }),
    "cifar10": ("frontier_cifar10", {
        "nonprivate": ["privacy=none"],
        "gaussian_eps8": [*_CENTRAL, "privacy.target_epsilon=8"],
    }),
    "cross_silo": ("cross_silo_dpsgd", {
        # the non-private twins train with a non-private recipe (unclipped gradients: small batches, small steps)
        "nonprivate_5rounds": ["privacy=none", "train.batch_size=64", "train.lr=0.05", "num_rounds=5"],
        "dpsgd_eps3_5rounds": ["privacy.local.target_epsilon=3", "num_rounds=5"],
        # the preset's 8 rounds at the same budget: more noise per step (sigma 2.26 instead of 1.88), 1.6x the steps
        "nonprivate_8rounds": ["privacy=none", "train.batch_size=64", "train.lr=0.05", "num_rounds=8"],
        "dpsgd_eps3_8rounds": ["privacy.local.target_epsilon=3", "num_rounds=8"],
    }),
}


def command(study: str, point: str, seed: int, out: Path) -> tuple[list[str], Path]:
    preset, points = STUDIES[study]
    run_dir = out / study / point / f"seed{seed}"
    overrides = [f"experiment={preset}", *points[point], f"seed={seed}", f"run_dir={run_dir}", "tracking.progress=false"]
    if (run_dir / "checkpoint.pt").exists():
        overrides.append("resume=true")
    return [sys.executable, str(ROOT / "scripts" / "simulate.py"), *overrides], run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="frontier.py", description=__doc__.split("\n")[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--only", nargs="+", default=None, help="points to run (default: all of the study's)")
    ap.add_argument("--out", type=Path, default=ROOT / "frontier")
    ap.add_argument("--dry-run", action="store_true", help="check and print the commands, run nothing")
    args = ap.parse_args(argv)
    points = STUDIES[args.study][1]
    chosen = args.only or list(points)
    unknown = sorted(set(chosen) - set(points))
    if unknown:
        print(f"fedpriv: error: unknown point(s) {', '.join(unknown)} in study {args.study}; choose from "
              f"{', '.join(points)}", file=sys.stderr)
        return 2
    jobs = [command(args.study, p, s, args.out) for p in chosen for s in args.seeds]
    for cmd, _ in jobs:  # everything checked before the first run
        try:
            compose_config([o for o in cmd[2:] if not o.startswith(("run_dir=", "resume="))])
        except UserError as exc:
            print(f"fedpriv: error: {' '.join(cmd[2:-1])}: {exc}", file=sys.stderr)
            return 2
    for cmd, run_dir in jobs:
        if (run_dir / "summary.json").exists():
            print(f"frontier: {run_dir} done, skipped")
            continue
        print(f"frontier: {' '.join(cmd[2:])}", flush=True)
        if args.dry_run:
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"frontier: {run_dir} exit {code} after {time.time() - started:.0f} s", flush=True)
        if code != 0:
            return code
    if not args.dry_run:
        print(f"frontier: compare with: python scripts/compare.py {args.out / args.study}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
