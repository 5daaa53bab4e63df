"""Which central mechanism puts the least noise into the model at a given epsilon, before any training.

    python scripts/mechanism_noise.py experiment=frontier_fmnist privacy.target_epsilon=1
    python scripts/mechanism_noise.py experiment=frontier_fmnist num_rounds=500 --groups 2 5 10

For the run the overrides describe, each mechanism (independent Gaussian noise with Poisson or cyclic
sampling, BandMF with G groups and G bands, DP-FTRL's tree restarted every G rounds) is calibrated to
the run's target epsilon with the ledger's own plan, and the script prints its noise multiplier and the
std of the noise on the running average of the released updates (the model of FedAvg / FTRL with
server learning rate 1), per coordinate, in units of the clip norm: at the last round and its root mean
square over the rounds. It is a proxy (momentum and adaptive clipping change what reaches the model),
not an accuracy; the README's frontier tables are measured runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.errors import UserError  # noqa: E402
from fedpriv.privacy.correlated import running_sum_noise  # noqa: E402
from fedpriv.privacy.plan import make_noise_plan, plan_epsilons  # noqa: E402
from fedpriv.sampling import cyclic_groups  # noqa: E402


def variants(groups: list[int]) -> list[tuple[str, list[str]]]:
    out = [("gaussian, poisson", ["sampling=poisson", "privacy.mechanism=gaussian"])]
    for g in groups:
        cyclic = ["sampling=cyclic", f"cyclic_groups={g}", "privacy.clipping=fixed"]
        out += [(f"gaussian, cyclic G={g}", [*cyclic, "privacy.mechanism=gaussian"]),
                (f"bandmf, cyclic G={g}, {g} bands", [*cyclic, "privacy.mechanism=bandmf"]),
                (f"tree, cyclic G={g}", [*cyclic, "privacy.mechanism=tree"])]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mechanism_noise.py", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="the run's Hydra overrides (a central-DP run with a target epsilon)")
    ap.add_argument("--groups", type=int, nargs="+", default=None,
                    help="cyclic group counts G to try (default: 2 and num_clients // clients_per_round)")
    args = ap.parse_args(argv)
    try:
        base = compose_config(args.overrides)
        groups = args.groups or sorted({2, cyclic_groups(base.num_clients, base.clients_per_round)})
        rows = []
        for label, extra in variants(groups):
            rc = compose_config([*args.overrides, "schedule=constant", *extra])
            plan = make_noise_plan(rc)
            z = plan.noise_multipliers[0]
            std = running_sum_noise(plan.mechanism, rc.num_rounds, bands=plan.bands, epoch=plan.cycle) * z / plan.denominator
            rows.append((label, plan.sampling_rate, z, plan_epsilons(plan)[-1], std[-1], math.sqrt(np.mean(std ** 2))))
    except UserError as exc:
        print(f"fedpriv: error: {exc}", file=sys.stderr)
        return 2
    print(f"{base.num_clients} clients, expected cohort {base.clients_per_round}, {base.num_rounds} rounds, "
          f"target epsilon {base.privacy.target_epsilon} (noise std on the running average, per coordinate, / clip norm)")
    print(f"{'mechanism':<32} {'q':>6} {'z':>8} {'epsilon':>8} {'last':>8} {'rms':>8}")
    for label, q, z, eps, last, rms in sorted(rows, key=lambda r: r[5]):
        print(f"{label:<32} {q:>6.3f} {z:>8.3f} {eps:>8.3f} {last:>8.4f} {rms:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
