"""Privacy risk assessment of a finished run's released model: membership inference beside the guarantee.

    python scripts/assess_risk.py outputs/2024-05-01/12-00-00
    python scripts/assess_risk.py RUN_DIR --reference-models 0          # loss attack only (fast)
    python scripts/assess_risk.py RUN_DIR --publish                     # also publish the figures

Runs an example-level membership attack on RUN_DIR/model.pt (loss threshold, Yeom et al. 2018, and
offline LiRA, Carlini et al. 2022, with a few reference models trained centrally), then writes

* RUN_DIR/operator_only/risk_assessment.json -- every figure (raw: computed on the clients' private
  training rows, NOT covered by the guarantee);
* a ``risk`` section in RUN_DIR/privacy.json -- the ceilings the published (epsilon, delta) implies,
  the method and a pointer to the operator-only file; the empirical figures only with --publish.

and prints the guarantee, the canary audit (if the run had one) and the attacks side by side.
A missing or foreign run folder, or one without model.pt, is one ``fedpriv: error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.errors import UserError  # noqa: E402
from fedpriv.federation import sampler_seed  # noqa: E402
from fedpriv.launch import fail  # noqa: E402
from fedpriv.logs import configure_logging  # noqa: E402
from fedpriv.risk import RiskOptions, assess, format_table, load_run, write  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run's folder (holds config.yaml, summary.json, model.pt)")
    p.add_argument("--reference-models", type=int, default=4, help="LiRA reference models; 0: loss attack only")
    p.add_argument("--reference-epochs", type=int, default=5, help="central training epochs of each reference model")
    p.add_argument("--reference-fraction", type=float, default=0.5,
                   help="share of the non-member rows given to the reference models (never scored)")
    p.add_argument("--max-members", type=int, default=10_000, help="members scored (a uniform sample)")
    p.add_argument("--max-users", type=int, default=2_000,
                   help="users scored on each side of the per-user attack (data sets whose clients are people)")
    p.add_argument("--seed", type=int, default=0, help="row split, member sample, reference initialisation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: far faster for small models on a shared machine)")
    p.add_argument("--publish", action="store_true",
                   help="also write the empirical figures into privacy.json (raw, with a caveat)")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    if args.reference_models < 0 or args.reference_epochs < 1:
        raise UserError("--reference-models must be >= 0 and --reference-epochs >= 1")
    if not 0.0 < args.reference_fraction < 1.0:
        raise UserError("--reference-fraction must be in (0, 1)")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    if args.max_members < 1 or args.max_users < 1:
        raise UserError("--max-members and --max-users must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        check(args)
        run = load_run(args.run_dir)
    except UserError as exc:
        fail(str(exc))
        raise  # unreachable
    options = RiskOptions(reference_models=args.reference_models, reference_epochs=args.reference_epochs,
                          reference_fraction=args.reference_fraction, max_members=args.max_members,
                          max_users=args.max_users, seed=args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    assessment = assess(run, options, sampler_seed(run.rc))
    assessment["seconds"] = time.time() - t0
    write(run.run_dir, assessment, args.publish)
    print(format_table(assessment))
    print(f"risk: wrote {Path(args.run_dir) / 'operator_only' / 'risk_assessment.json'} (operator only) and the risk "
          f"section of privacy.json ({'with' if args.publish else 'without'} the empirical figures) in "
          f"{assessment['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
