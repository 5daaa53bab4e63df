"""Compare fedpriv runs: what differs in their configs, how accurate and how private they ended up.

    python scripts/compare.py multirun/2024-05-01/12-00-00
    python scripts/compare.py outputs/run_a outputs/run_b --out plots --html report.html
    python scripts/compare.py outputs/run_a/wandb/offline-run-*     # W&B offline runs too

Prints a table (config keys that differ across runs, rounds, final accuracy, epsilon, wall time),
then, when some runs differ only by seed, a seed-aggregated table (one row per group: seeds, mean
and spread of the final accuracy, epsilon, gap to the non-private group), and writes
compare_accuracy.png, compare_epsilon.png, compare_frontier.png and frontier_mechanisms.png (one
curve per mechanism, seeds aggregated) to --out (default: the given folder). Plots use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
