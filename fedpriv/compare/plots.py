"""Matplotlib figures of compared runs: accuracy and epsilon per round, the privacy-utility frontier
(one point per run), and the frontier across mechanisms (one point per group of runs differing only by seed).

matplotlib is imported only inside the functions that draw (Agg backend): --no-plots never loads it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fedpriv.compare.record import Run, as_float
from fedpriv.compare.seeds import POPULATION_PREFIXES, SeedGroup, group_by_seed, group_differing_keys
from fedpriv.compare.table import _cell

PLOT_NAMES = {
    "accuracy": "compare_accuracy.png",
    "epsilon": "compare_epsilon.png",
    "frontier": "compare_frontier.png",
    "mechanisms": "frontier_mechanisms.png",
}


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


_MECHANISM_NAMES = {"gaussian": "DP-FedAvg", "tree": "DP-FTRL tree", "bandmf": "BandMF"}
_MODE_PREFIX = {"central": "", "local": "local DP ", "central_local": "central+local DP "}


def mechanism_label(group: SeedGroup) -> str:
    """``DP-FedAvg (gaussian, poisson)``, ``BandMF (cyclic)``, ``DP-FTRL tree (cyclic)``: mechanism and sampling."""
    mech = group.mechanism
    name = _MECHANISM_NAMES.get(mech, mech)
    inner = f"{mech}, {group.sampling}" if mech == "gaussian" else group.sampling
    mode = group.runs[0].privacy_mode
    return f"{_MODE_PREFIX.get(mode, mode + ' ')}{name} ({inner})"


@dataclass
class MechanismCurves:
    """What :func:`plot_frontier_mechanisms` draws. ``curves``: label -> [(epsilon, mean, min, max, n)],
    sorted by epsilon; ``infinite``: label -> [(mean, min, max, n)] of private groups without a finite
    epsilon; ``references``: label -> (mean, min, max, n) of the non-private groups."""

    curves: dict[str, list[tuple[float, float, float, float, int]]] = field(default_factory=dict)
    infinite: dict[str, list[tuple[float, float, float, int]]] = field(default_factory=dict)
    references: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)


def mechanism_curves(runs: Sequence[Run]) -> MechanismCurves:
    """Seed groups (:func:`fedpriv.compare.seeds.group_by_seed`) sorted into one curve per mechanism and
    sampling (and population, where private groups differ in it) and the non-private reference lines."""
    groups = group_by_seed(runs)
    private = [g for g in groups if g.is_private]
    population_keys = [k for k in group_differing_keys(private) if k.startswith(POPULATION_PREFIXES)]
    public = [g for g in groups if not g.is_private]
    public_keys = group_differing_keys(public)
    out = MechanismCurves()
    for g in private:
        label = mechanism_label(g)
        if population_keys:
            label += " " + ",".join(f"{k}={_cell(g.config.get(k))}" for k in population_keys)
        accs, eps = g.accuracies, g.epsilon
        stats = (g.mean, min(accs), max(accs), len(accs))
        if eps is not None and math.isfinite(eps) and eps > 0:
            out.curves.setdefault(label, []).append((eps, *stats))
        else:
            out.infinite.setdefault(label, []).append(stats)
    for points in out.curves.values():
        points.sort(key=lambda p: (p[0], -p[1]))
    for g in public:
        accs = g.accuracies
        extra = ",".join(f"{k}={_cell(g.config.get(k))}" for k in public_keys)
        label = f"non-private ({len(accs)} seed{'s' if len(accs) != 1 else ''})" + (f" {extra}" if extra else "")
        out.references[label] = (g.mean, min(accs), max(accs), len(accs))
    return out


def _minor_epsilon_label(value: float, _pos: Any) -> str:
    """Label the 2 and 5 between powers of ten (0.2, 0.5, 2, 5, 20, ...), leave the others blank."""
    if value <= 0:
        return ""
    lead = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if min(abs(lead - 2), abs(lead - 5)) < 1e-6 else ""


def plot_frontier_mechanisms(runs: Sequence[Run], path: Path) -> Path | None:
    """The privacy-utility frontier across mechanisms, seeds aggregated.

    x: the published run epsilon at the run's delta (log scale; the largest over a group's seeds);
    y: the final round's test accuracy, mean over the seeds of a group (runs identical but for
    ``seed``), error bars from the lowest to the highest seed, ``n=`` the number of seeds. One curve
    per mechanism and sampling; where several groups of a mechanism share an epsilon (a sweep of other
    keys) all are drawn and the line joins the best mean. Non-private groups are horizontal lines
    (mean) with a shaded min..max band; private groups without a finite epsilon are dash-dot lines.
    Unfinished runs are left off. :func:`mechanism_curves` returns what is drawn."""
    data = mechanism_curves(runs)
    if not data.curves and not data.infinite and not data.references:
        return None
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy, optional for --no-plots

    fig, ax = _figure()
    cmap = plt.get_cmap("tab10")
    n = 0
    for i, (label, points) in enumerate(data.curves.items()):
        color = cmap(i % cmap.N)
        eps = [p[0] for p in points]
        mean = [p[1] for p in points]
        yerr = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        ax.errorbar(eps, mean, yerr=yerr, fmt="o", color=color, capsize=3, markersize=5, label=label, zorder=3)
        best: dict[float, float] = {}
        for e, m, *_ in points:
            best[e] = max(best.get(e, -math.inf), m)
        ax.plot(list(best), list(best.values()), color=color, linewidth=1.2, alpha=0.8)
        for e, m, _, _, k in points:
            ax.annotate(f"n={k}", (e, m), textcoords="offset points", xytext=(4, -10), fontsize="x-small", color=color)
        n += 1
    for j, (label, stats) in enumerate(data.infinite.items(), start=len(data.curves)):
        for k, (mean, lo, hi, seeds) in enumerate(stats):
            ax.axhline(mean, linestyle="-.", color=cmap(j % cmap.N), linewidth=1.2,
                       label=f"{label} epsilon = inf ({seeds} seeds)" if k == 0 else None)
        n += 1
    greys = ["0.2", "0.45", "0.6", "0.75"]
    for k, (label, (mean, lo, hi, _)) in enumerate(data.references.items()):
        grey = greys[k % len(greys)]
        ax.axhline(mean, linestyle="--", color=grey, linewidth=1.2, label=label)
        if hi > lo:
            ax.axhspan(lo, hi, color=grey, alpha=0.15, linewidth=0)
        n += 1
    if data.curves:
        from matplotlib.ticker import FuncFormatter  # noqa: PLC0415 - heavy, optional for --no-plots

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # "1", "10", not "10^0"
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_epsilon_label))
    else:
        ax.text(0.5, 0.5, "no group with a finite epsilon", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xlabel("epsilon (published, whole run, at the run's delta; log scale)")
    ax.set_ylabel("final test accuracy (mean over seeds)")
    ax.set_title("Privacy-utility frontier by mechanism\n(mean over seeds; error bars and bands: min..max over seeds)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, n)
    return _save(fig, path)


def draw_plots(runs: Sequence[Run], out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """The PNGs (:data:`PLOT_NAMES`) in ``out_dir``, and a note for each one no run has data for."""
    made: dict[str, Path] = {}
    notes: list[str] = []
    drawers = (("accuracy", plot_accuracy), ("epsilon", plot_epsilon), ("frontier", plot_frontier),
               ("mechanisms", plot_frontier_mechanisms))
    for name, fn in drawers:
        p = fn(runs, out_dir / PLOT_NAMES[name])
        if p is None:
            notes.append(f"no {name} plot: no run has the data")
        else:
            made[name] = p
    return made, notes
