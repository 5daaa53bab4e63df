"""Compare finished runs: a table of what differs and how they did, and privacy-utility plots.

Modules: record (Run), runs (finding, loading), table (differing keys, names), seeds (runs differing only by
seed, aggregated), plots, report (HTML), cli."""

from fedpriv.compare.cli import default_out_dir, main
from fedpriv.compare.plots import (
    PLOT_NAMES,
    MechanismCurves,
    draw_plots,
    mechanism_curves,
    pareto_front,
    plot_accuracy,
    plot_epsilon,
    plot_frontier,
    plot_frontier_mechanisms,
)
from fedpriv.compare.record import Run, as_float
from fedpriv.compare.report import write_html
from fedpriv.compare.runs import find_runs, is_run_folder, load_fedpriv_run, load_wandb_offline_run
from fedpriv.compare.seeds import SeedGroup, group_by_seed, mechanism, seed_table
# The table() function stays in fedpriv.compare.table: re-exported here it would shadow that module.
from fedpriv.compare.table import IGNORED_KEY_PREFIXES, differing_keys, format_table, label_runs, natural_key

__all__ = [
    "IGNORED_KEY_PREFIXES",
    "PLOT_NAMES",
    "MechanismCurves",
    "Run",
    "SeedGroup",
    "as_float",
    "default_out_dir",
    "differing_keys",
    "draw_plots",
    "find_runs",
    "format_table",
    "group_by_seed",
    "is_run_folder",
    "label_runs",
    "load_fedpriv_run",
    "load_wandb_offline_run",
    "main",
    "mechanism",
    "mechanism_curves",
    "natural_key",
    "pareto_front",
    "plot_accuracy",
    "plot_epsilon",
    "plot_frontier",
    "plot_frontier_mechanisms",
    "seed_table",
    "write_html",
]
