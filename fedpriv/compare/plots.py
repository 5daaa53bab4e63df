"""Matplotlib figures of compared runs: accuracy and epsilon per round, the privacy-utility frontier.

matplotlib is imported only inside the functions that draw (Agg backend): --no-plots never loads it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from fedpriv.compare.record import Run, as_float

PLOT_NAMES = {"accuracy": "compare_accuracy.png", "epsilon": "compare_epsilon.png", "frontier": "compare_frontier.png"}


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
    import matplotlib  # noqa: PLC0415 - heavy, optional for --no-plots

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the backend

    return plt.subplots(figsize=(8, 5), dpi=110)


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy, optional for --no-plots

    plt.close(fig)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _close(fig)
    return path


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - heavy, optional for --no-plots

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _color(runs: Sequence[Run], run: Run) -> Any:
    """One colour per run, the same in every plot."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy, optional for --no-plots

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
    """Central epsilon spent per round (planned as a dotted line where it differs), local max client dashed."""
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
        _close(fig)
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
    """Final accuracy against the run's epsilon; non-private and epsilon = inf runs are horizontal
    reference lines; the Pareto front is a step line. Unfinished runs are left off."""
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
    """The three PNGs (:data:`PLOT_NAMES`) in ``out_dir``, and a note for each one no run has data for."""
    made: dict[str, Path] = {}
    notes: list[str] = []
    for name, fn in (("accuracy", plot_accuracy), ("epsilon", plot_epsilon), ("frontier", plot_frontier)):
        p = fn(runs, out_dir / PLOT_NAMES[name])
        if p is None:
            notes.append(f"no {name} plot: no run has the data")
        else:
            made[name] = p
    return made, notes
