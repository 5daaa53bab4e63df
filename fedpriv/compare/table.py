"""The text table: which config keys differ across runs, each run's name, natural sort order."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from fedpriv.compare.record import Run, as_float

# Config keys that never explain a difference in results.
IGNORED_KEY_PREFIXES = ("run_dir", "resume", "tracking")


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (a key missing somewhere differs)."""
    runs = [r for r in runs if r.config]  # a run without a saved config cannot tell
    if len(runs) < 2:
        return []
    keys = sorted(set().union(*(r.config.keys() for r in runs)))
    out = []
    for key in keys:
        if key.startswith(IGNORED_KEY_PREFIXES):
            continue
        values = [json.dumps(r.config.get(key, "<missing>"), sort_keys=True, default=str) for r in runs]
        if len(set(values)) > 1:
            out.append(key)
    return out


def label_runs(runs: list[Run]) -> None:
    """Name each run by the config values that set it apart (``privacy.target_epsilon=4``), else by
    its folder relative to the runs' common parent."""
    if not runs:
        return
    paths = [r.path.resolve() for r in runs]
    root = Path(os.path.commonpath([str(p) for p in paths]))
    for run, p in zip(runs, paths):
        rel = p.relative_to(root).as_posix() if p != root else p.name
        run.label = (rel or p.name) + _source_suffix(run)
    if len(runs) == 1:
        runs[0].label = runs[0].path.resolve().name + _source_suffix(runs[0])
        return
    keys = differing_keys(runs)
    if keys and all(r.config for r in runs):
        by_keys = [",".join(f"{k}={_cell(r.config.get(k))}" for k in keys) for r in runs]
        if len(set(by_keys)) == len(runs) and max(map(len, by_keys)) <= 60:
            for run, text in zip(runs, by_keys):
                run.label = text + _source_suffix(run)
    for run in runs:
        if not run.finished:
            run.label += "(unfinished)"


def _source_suffix(run: Run) -> str:
    return " [wandb]" if run.source == "wandb-offline" else ""


def natural_key(text: str) -> list[tuple[int, float, str]]:
    """Sort "10" after "9", and "inf" after every number."""
    key = []
    for part in re.split(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?|inf)", text):
        if not part:
            continue
        try:
            key.append((0, float(part), ""))
        except ValueError:
            key.append((1, 0.0, part))
    return key


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _eps_cell(run: Run) -> str:
    eps = run.epsilon
    if eps is not None:
        return _cell(eps)
    return "-" if run.is_private else "none"


def table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run, the differing config keys, rounds, final accuracy, epsilon, wall time."""
    keys = differing_keys(runs)
    with_local = any(r.local_epsilon is not None for r in runs)
    header = ["run", *keys, "rounds", "final_acc", "epsilon"] + (["local_eps_max"] if with_local else []) + ["wall_s"]
    rows = []
    for r in runs:
        row = [r.label]
        row += [_cell(r.config.get(k)) for k in keys]
        row.append(_cell(r.summary.get("rounds_completed", len(r.rounds) or None)))
        acc = r.final_accuracy
        row.append(f"{acc:.4f}" if acc is not None else "-")
        row.append(_eps_cell(r))
        if with_local:
            row.append(_cell(r.local_epsilon))
        wall = as_float(r.summary.get("wall_seconds"))
        row.append(f"{wall:.1f}" if wall is not None else "-")
        rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    numeric = [all(_looks_numeric(row[i]) for row in rows) and i > 0 for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _looks_numeric(text: str) -> bool:
    if text in ("-", "inf", "-inf", "none"):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False
