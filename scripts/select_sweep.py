r"""Tune on private data with one honest epsilon: plan a random-length sweep, run it, release the best run.

Papernot & Steinke 2022 (repeat-and-select; see fedpriv/privacy/sweep_selection.py for the protocol
and its accounting). Three steps, in this order:

    # 1. plan: draws the number of runs K (Poisson with mean 12 here) BEFORE any run, gives each run
    #    a uniformly random candidate of the grid and a seed, writes <dir>/selection_plan.json
    #    (operator-only) and prints the Hydra commands to run
    python scripts/select_sweep.py plan --mean 12 --shape inf --sweep-dir multirun/tune-lr -- \
        experiment=quickstart privacy=central train.lr=0.02,0.05,0.1 strategy=fedavg,fedavgm

    # 2. run exactly the printed commands (they all write into --sweep-dir)

    # 3. select: checks the folder holds exactly the planned, finished runs, picks the best by a
    #    published figure (default summary.json's final_accuracy), prints the tuning's epsilon and
    #    writes <dir>/selection.json
    python scripts/select_sweep.py select multirun/tune-lr

Release only the winning run's files (its model, metrics, privacy.json; under a new folder name, since
Hydra's job number in its name hints at how many runs its candidate had) and selection.json. K, the plan
and the other runs' files stay with the operator: the guarantee assumes nobody sees them.
--shape: inf = Poisson, 1 = geometric, 0 = logarithmic, other values > 0 = truncated negative
binomial (Papernot & Steinke recommend small shapes, e.g. 1, for heavy-tailed search; Poisson
concentrates K near its mean).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.errors import UserError  # noqa: E402
from fedpriv.launch import fail  # noqa: E402
from fedpriv.privacy import sweep_selection as ss  # noqa: E402
from fedpriv.run_folder import write_json  # noqa: E402


def plan(args: argparse.Namespace) -> None:
    sweep_dir = Path(args.sweep_dir)
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise UserError(f"--sweep-dir {sweep_dir} is not empty: a tuning needs a fresh folder")
    the_plan = ss.make_plan(args.overrides, args.mean, args.shape, sweep_dir)
    the_plan["commands"] = ss.commands(the_plan, args.launcher)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / ss.PLAN, the_plan)
    print(f"{len(the_plan['candidates'])} candidate(s); K = {the_plan['num_runs']} run(s) drawn from "
          f"{the_plan['distribution']} (mean {args.mean}); plan: {sweep_dir / ss.PLAN} (operator-only)")
    for command in the_plan["commands"]:
        print(command)
    if not the_plan["commands"]:
        print("K = 0: no run; `select` will release nothing (and costs nothing)")


def select(args: argparse.Namespace) -> None:
    sweep_dir = Path(args.sweep_dir)
    path = sweep_dir / ss.PLAN
    if not path.exists():
        raise UserError(f"{sweep_dir}: no {ss.PLAN}; plan the tuning first (the run count must be drawn before the runs)")
    result = ss.select(json.loads(path.read_text()), sweep_dir, args.metric, args.delta)
    write_json(sweep_dir / ss.RESULT, result)
    if result["winner"] is None:
        print(result["note"])
        return
    w = result["winner"]
    print(f"best run: {w['run_dir']}  ({' '.join(w['candidate']) or 'the only candidate'}; {args.metric} = {w['score']:.4f})")
    reported = result["one_run_epsilon_reported"]
    reported = f"{reported:.4f}" if isinstance(reported, (int, float)) else str(reported)
    print(f"epsilon of the whole tuning = {result['epsilon']:.4f} at delta = {result['delta']:.3g} "
          f"({result['distribution']}, mean {result['mean']} runs; one run alone: {result['one_run_epsilon']:.4f} "
          f"by RDP, {reported} as the run reported it)")
    print(f"written: {sweep_dir / ss.RESULT}; publish only the best run's files and this one (under a new folder "
          "name: Hydra's job number in the old one hints at how many runs its candidate had)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("plan", help="draw the random number of runs and print the Hydra commands")
    p.add_argument("--mean", type=float, required=True, help="expected number of runs (>= 1)")
    p.add_argument("--shape", type=float, default=float("inf"), help="inf = Poisson; 1 = geometric; 0 = logarithmic")
    p.add_argument("--sweep-dir", required=True, help="a new folder; every planned run writes into it")
    p.add_argument("--launcher", default="python scripts/simulate.py")
    p.add_argument("overrides", nargs="*", help="Hydra overrides; key=a,b,c is swept, key=a is fixed")
    s = sub.add_parser("select", help="release the best planned run and the tuning's epsilon")
    s.add_argument("sweep_dir")
    s.add_argument("--metric", default="final_accuracy", help="a published figure (summary.json or metrics.jsonl)")
    s.add_argument("--delta", type=float, default=None, help="default: the runs' own delta")
    args = parser.parse_args(argv)
    try:
        (plan if args.step == "plan" else select)(args)
    except UserError as exc:
        fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
