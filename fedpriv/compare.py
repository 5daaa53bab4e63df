"""Compare finished runs: a table of what differs and how they did, and privacy-utility plots.

Inputs are run folders (``summary.json`` / ``metrics.jsonl`` / ``config.yaml``), folders holding
them at any depth (a Hydra multirun), or W&B offline run folders (``wandb/offline-run-*``, read
from their ``.wandb`` log; see :mod:`fedpriv.tracking.wandb_offline`). A fedpriv run folder's own
``wandb/`` sub-folder is not listed a second time.

Outputs: the table on stdout; ``compare_accuracy.png`` (test accuracy per round),
``compare_epsilon.png`` (epsilon spent per round, private runs) and ``compare_frontier.png``
(final accuracy against the run's epsilon; non-private and epsilon = inf runs are horizontal
reference lines; the Pareto front is drawn as a step line); optionally one self-contained HTML.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fedpriv.tracking.base import flatten_config

PLOT_NAMES = {"accuracy": "compare_accuracy.png", "epsilon": "compare_epsilon.png", "frontier": "compare_frontier.png"}
# Config keys that never explain a difference in results.
IGNORED_KEY_PREFIXES = ("run_dir", "resume", "tracking")


@dataclass
class Run:
    path: Path
    source: str  # "fedpriv" | "wandb-offline"
    config: dict[str, Any] = field(default_factory=dict)  # flat, dotted keys
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def finished(self) -> bool:
        """A run that wrote its summary (completed, or stopped by its budget); else killed or running."""
        return bool(self.summary)

    @property
    def privacy_mode(self) -> str:
        return str(self.summary.get("privacy") or self.config.get("privacy.mode") or "none")

    @property
    def final_accuracy(self) -> float | None:
        acc = as_float(self.summary.get("final_accuracy"))
        if acc is None:
            accs = [a for a in (as_float(r.get("test_accuracy")) for r in self.rounds) if a is not None and math.isfinite(a)]
            acc = accs[-1] if accs else None
        return acc

    @property
    def epsilon(self) -> float | None:
        """Central (user-level) epsilon of the whole run; inf for a private run without a finite bound."""
        eps = as_float(self.summary.get("epsilon"))
        if eps is None:
            per_round = [e for e in (as_float(r.get("epsilon")) for r in self.rounds) if e is not None]
            eps = per_round[-1] if per_round else None
        return eps

    @property
    def local_epsilon(self) -> float | None:
        eps = as_float(self.summary.get("local_epsilon_max"))
        if eps is None:
            per_round = [e for e in (as_float(r.get("local_epsilon_max")) for r in self.rounds) if e is not None]
            eps = per_round[-1] if per_round else None
        return eps

    @property
    def is_private(self) -> bool:
        return self.privacy_mode != "none" or self.epsilon is not None or self.local_epsilon is not None


def as_float(value: Any) -> float | None:
    """Numbers and the strings LocalFiles writes for infinities; None for anything else (and NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# --- loading ----------------------------------------------------------------------------------


def is_run_folder(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()


def load_fedpriv_run(path: Path) -> Run:
    import yaml  # noqa: PLC0415

    run = Run(path=path, source="fedpriv")
    cfg_file = path / "config.yaml"
    if not cfg_file.exists() and (path / ".hydra" / "config.yaml").exists():
        cfg_file = path / ".hydra" / "config.yaml"
    if cfg_file.exists():
        loaded = yaml.safe_load(cfg_file.read_text()) or {}
        if isinstance(loaded, dict):
            loaded.pop("hydra", None)
            run.config = flatten_config(loaded)
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            if line.strip():
                try:
                    run.rounds.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line of a killed run
    if (path / "summary.json").exists():
        run.summary = json.loads((path / "summary.json").read_text())
    return run


def load_wandb_offline_run(path: Path) -> Run:
    from fedpriv.tracking.wandb_offline import read_offline_run  # noqa: PLC0415

    off = read_offline_run(path)
    run = Run(path=path, source="wandb-offline")
    run.config = flatten_config(off.config)
    for row in off.history:
        rec = {k: v for k, v in row.items() if not k.startswith("_")}
        rec.setdefault("round", row.get("_step"))
        run.rounds.append(rec)
    run.summary = {k: v for k, v in off.summary.items() if not k.startswith("_")}
    if not run.rounds and not run.summary:
        raise ValueError("no history and no summary")
    return run


def _is_wandb_offline(path: Path) -> bool:
    """``wandb/offline-run-*`` (or an online run's local ``wandb/run-*``) holding a ``.wandb`` log."""
    from fedpriv.tracking.wandb_offline import is_offline_run_folder  # noqa: PLC0415

    return is_offline_run_folder(path)


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """All runs under ``paths`` (deduplicated) and notes about what was skipped."""
    runs: list[Run] = []
    notes: list[str] = []
    seen: set[Path] = set()

    def add(loader: Any, p: Path) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        try:
            runs.append(loader(p))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"skipped {p}: {exc}")

    def walk(p: Path) -> None:
        if is_run_folder(p):
            add(load_fedpriv_run, p)
            return  # its wandb/ copy is the same run
        if _is_wandb_offline(p):
            add(load_wandb_offline_run, p)
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError as exc:
            notes.append(f"cannot list {p}: {exc}")
            return
        for child in children:
            if child.name == "latest-run" and child.is_symlink():
                continue  # wandb's alias of a run listed anyway
            walk(child)

    for given in paths:
        p = Path(given)
        if not p.exists():
            notes.append(f"not found: {p}")
        elif p.is_file() and p.suffix == ".wandb":
            add(load_wandb_offline_run, p.parent)
        elif p.is_dir():
            walk(p)
        else:
            notes.append(f"not a run folder: {p}")
    _label(runs)
    return runs, notes


def _label(runs: list[Run]) -> None:
    """Name each run by the config values that set it apart (``privacy.target_epsilon=4``), else by
    its folder relative to the runs' common parent."""
    if not runs:
        return
    paths = [r.path.resolve() for r in runs]
    root = Path(os.path.commonpath([str(p) for p in paths]))
    for run, p in zip(runs, paths):
        rel = p.relative_to(root).as_posix() if p != root else p.name
        run.label = (rel or p.name) + (" [wandb]" if run.source == "wandb-offline" else "")
    if len(runs) == 1:
        runs[0].label = runs[0].path.resolve().name + (" [wandb]" if runs[0].source == "wandb-offline" else "")
        return
    keys = differing_keys(runs)
    if keys and all(r.config for r in runs):
        by_keys = [",".join(f"{k}={_cell(r.config.get(k))}" for k in keys) for r in runs]
        if len(set(by_keys)) == len(runs) and max(map(len, by_keys)) <= 60:
            for run, text in zip(runs, by_keys):
                run.label = text + (" [wandb]" if run.source == "wandb-offline" else "")
    for run in runs:
        if not run.finished:
            run.label += "(unfinished)"


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


# --- table ------------------------------------------------------------------------------------

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


# --- plots ------------------------------------------------------------------------------------


def _series(run: Run, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, rec in enumerate(run.rounds, start=1):
        y = as_float(rec.get(key))
        x = as_float(rec.get("round"))
        if y is None or not math.isfinite(y):
            continue
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def _figure() -> tuple[Any, Any]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt.subplots(figsize=(8, 5), dpi=110)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _color(runs: Sequence[Run], run: Run) -> Any:
    """One colour per run, the same in every plot."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    return cmap(list(runs).index(run) % cmap.N)


def _legend(ax: Any, n: int) -> None:
    if n:
        ax.legend(fontsize="small", loc="best", ncol=1 if n <= 8 else 2)


def plot_accuracy(runs: Sequence[Run], path: Path) -> Path | None:
    drawn = [(r, *_series(r, "test_accuracy")) for r in runs]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, ax = _figure()
    for run, xs, ys in drawn:
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=run.label, color=_color(runs, run))
    _integer_rounds(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy per round")
    ax.grid(alpha=0.3)
    _legend(ax, len(drawn))
    return _save(fig, path)


def plot_epsilon(runs: Sequence[Run], path: Path) -> Path | None:
    fig, ax = _figure()
    n = 0
    values: list[float] = []
    for run in runs:
        xs, ys = _series(run, "epsilon")
        if xs:
            reaches_inf = any(as_float(r.get("epsilon")) == math.inf for r in run.rounds)
            label = run.label + (" (then inf)" if reaches_inf else "")
            (line,) = ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label, color=_color(runs, run))
            pxs, pys = _series(run, "planned_epsilon")
            if pxs and dict(zip(pxs, pys)) != dict(zip(xs, ys)):
                ax.plot(pxs, pys, linestyle=":", color=line.get_color(), label=f"{run.label} (planned)")
                values += pys
            values += ys
            n += 1
        lxs, lys = _series(run, "local_epsilon_max")
        if lxs:
            ax.plot(lxs, lys, linestyle="--", label=f"{run.label} (local, max client)", color=_color(runs, run))
            values += lys
            n += 1
    if not n:
        import matplotlib.pyplot as plt  # noqa: PLC0415

        plt.close(fig)
        return None
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    _integer_rounds(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("Privacy spent per round (central: user-level; local: example-level)")
    ax.grid(alpha=0.3)
    _legend(ax, n)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (epsilon, accuracy) not beaten by one with less epsilon and more accuracy."""
    front: list[tuple[float, float]] = []
    for eps, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((eps, acc))
    return front


def plot_frontier(runs: Sequence[Run], path: Path) -> Path | None:
    points, refs = [], []
    for run in runs:
        acc = run.final_accuracy
        if acc is None or not run.finished:  # a run cut short is not a point of the frontier
            continue
        eps = run.epsilon if run.epsilon is not None else run.local_epsilon
        if eps is not None and math.isfinite(eps):
            points.append((eps, acc, run))
        else:
            refs.append((acc, run, "non-private" if not run.is_private else "epsilon = inf"))
    if not points and not refs:
        return None
    fig, ax = _figure()
    for eps, acc, run in points:
        ax.scatter([eps], [acc], s=36, zorder=3, label=run.label, color=_color(runs, run))
        ax.annotate(f"{eps:.3g}", (eps, acc), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    front = pareto_front([(e, a) for e, a, _ in points])
    if len(front) > 1:
        ax.step([e for e, _ in front], [a for _, a in front], where="post", color="0.3", linewidth=1, alpha=0.7, label="Pareto front")
    styles = {"non-private": "--", "epsilon = inf": "-."}
    for acc, run, kind in refs:
        ax.axhline(acc, linestyle=styles[kind], color=_color(runs, run), linewidth=1.2, label=f"{run.label} ({kind})")
    if points and all(e > 0 for e, _, _ in points) and max(e for e, _, _ in points) / min(e for e, _, _ in points) > 20:
        ax.set_xscale("log")
    if not points:
        ax.text(0.5, 0.5, "no run with a finite epsilon", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xlim(0, 1)
    ax.set_xlabel("epsilon (central, whole run; local max client if no central)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Privacy-utility frontier")
    ax.grid(alpha=0.3)
    _legend(ax, len(points) + len(refs) + (1 if len(front) > 1 else 0))
    return _save(fig, path)


def draw_plots(runs: Sequence[Run], out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    made: dict[str, Path] = {}
    notes: list[str] = []
    for name, fn in (("accuracy", plot_accuracy), ("epsilon", plot_epsilon), ("frontier", plot_frontier)):
        p = fn(runs, out_dir / PLOT_NAMES[name])
        if p is None:
            notes.append(f"no {name} plot: no run has the data")
        else:
            made[name] = p
    return made, notes


# --- HTML -------------------------------------------------------------------------------------


def write_html(path: Path, header: list[str], rows: list[list[str]], plots: dict[str, Path], notes: list[str], title: str) -> Path:
    def img(name: str, p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(p.name)}</figcaption></figure>'

    thead = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    tbody = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table><thead><tr>{thead}</tr></thead><tbody>
{tbody}
</tbody></table>
{f"<ul>{notes_html}</ul>" if notes else ""}
{"".join(img(n, p) for n, p in plots.items())}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


# --- command line -----------------------------------------------------------------------------


def default_out_dir(paths: Sequence[str | Path]) -> Path:
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
