"""The command line of ``scripts/compare.py``: print the table, write the PNGs and optionally the HTML report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from fedpriv.compare.plots import draw_plots
from fedpriv.compare.report import write_html
from fedpriv.compare.runs import find_runs
from fedpriv.compare.seeds import seed_table
from fedpriv.compare.table import format_table, natural_key, table


def default_out_dir(paths: Sequence[str | Path]) -> Path:
    """The given folder (a file's folder), or the common parent of several."""
    dirs = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    if len(dirs) == 1:
        return dirs[0]
    return Path(os.path.commonpath([str(d.resolve()) for d in dirs]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="compare.py",
        description="Compare fedpriv runs: a table of the config keys that differ, final accuracy, epsilon and "
        "wall time, and plots of accuracy and epsilon per round and of the privacy-utility frontier.",
    )
    ap.add_argument("paths", nargs="+", help="run folders, multirun folders (searched recursively), or wandb offline-run-* folders")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the given folder, or the common parent of several)")
    ap.add_argument("--html", type=Path, default=None, help="also write one self-contained HTML report here")
    ap.add_argument("--no-plots", action="store_true", help="print the table only")
    args = ap.parse_args(argv)

    runs, notes = find_runs(args.paths)
    for note in notes:
        print(f"compare: note: {note}", file=sys.stderr)
    if not runs:
        print("compare: error: no runs found (a run folder holds summary.json or metrics.jsonl)", file=sys.stderr)
        return 2
    runs.sort(key=lambda r: natural_key(r.label))
    header, rows = table(runs)
    print(format_table(header, rows))
    seeds = seed_table(runs)  # only when some runs differ by seed alone
    if seeds is not None:
        print("\nseeds aggregated (runs identical but for seed; acc: final test accuracy, std over seeds n-1; "
              "epsilon: the largest; gap: mean - the non-private group of the same population):")
        print(format_table(*seeds))

    if args.no_plots and args.html is None:
        return 0
    out_dir = args.out if args.out is not None else default_out_dir(args.paths)
    plots, plot_notes = ({}, []) if args.no_plots else draw_plots(runs, out_dir)
    for note in plot_notes:
        print(f"compare: note: {note}", file=sys.stderr)
    for p in plots.values():
        print(f"compare: wrote {p}")
    if args.html is not None:
        title = f"fedpriv: {len(runs)} runs compared"
        write_html(args.html, header, rows, plots, notes + plot_notes, title)
        print(f"compare: wrote {args.html}")
    return 0
