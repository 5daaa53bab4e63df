"""Runs that differ only by ``seed``, aggregated: the seed groups, and the seed-aggregated table.

A group is the set of finished runs whose configs are equal once ``seed``, ``run_dir``, ``resume`` and
``tracking.*`` are removed (``privacy.mechanism``, absent in runs older than the key, counts as
``gaussian``). Its accuracy is each run's final test accuracy; its epsilon is the published run epsilon
(at the run's delta; the local max-client epsilon for local-only runs), the same for every seed of a
calibrated run, so the table shows the largest."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from fedpriv.compare.record import Run
from fedpriv.compare.table import IGNORED_KEY_PREFIXES, _cell

# Keys that say which population a run trained on: a non-private reference must agree on them.
POPULATION_PREFIXES = ("num_clients", "dataset.", "partition.", "data.")
_CENTRAL_MODES = ("central", "central_local")


def mechanism(run: Run) -> str:
    """The noise mechanism: ``none`` for a non-private run; a run without ``privacy.mechanism`` is gaussian."""
    if run.privacy_mode == "none":
        return "none"
    if run.privacy_mode in _CENTRAL_MODES:
        return str(run.config.get("privacy.mechanism") or "gaussian")
    return "gaussian"  # local DP-SGD


def sampling(run: Run) -> str:
    return str(run.config.get("sampling") or "poisson")  # the schema's default


def group_config(run: Run) -> dict[str, Any]:
    """The config that defines the run's seed group (ignored keys and seed removed, mechanism filled in)."""
    cfg = {k: v for k, v in run.config.items() if k != "seed" and not k.startswith(IGNORED_KEY_PREFIXES)}
    cfg.pop("privacy.mechanism", None)
    if run.privacy_mode in _CENTRAL_MODES:
        cfg["privacy.mechanism"] = mechanism(run)
    return cfg


@dataclass
class SeedGroup:
    config: dict[str, Any]  # group_config of its runs
    runs: list[Run] = field(default_factory=list)

    @property
    def accuracies(self) -> list[float]:
        return [a for a in (r.final_accuracy for r in self.runs) if a is not None]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds; None for a single seed."""
        accs = self.accuracies
        return statistics.stdev(accs) if len(accs) > 1 else None

    @property
    def epsilon(self) -> float | None:
        """The largest published epsilon of its runs (inf if any run has no finite bound); None if non-private."""
        values = [r.epsilon if r.epsilon is not None else r.local_epsilon for r in self.runs]
        values = [v for v in values if v is not None]
        if values:
            return max(values)
        return math.inf if self.is_private else None

    @property
    def is_private(self) -> bool:
        return any(r.is_private for r in self.runs)

    @property
    def mechanism(self) -> str:
        return mechanism(self.runs[0])

    @property
    def sampling(self) -> str:
        return sampling(self.runs[0])

    def population(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if k.startswith(POPULATION_PREFIXES)}


def group_by_seed(runs: Sequence[Run]) -> list[SeedGroup]:
    """Finished runs with a final accuracy, grouped by everything but the seed (first-seen order)."""
    groups: dict[str, SeedGroup] = {}
    for run in runs:
        if not run.finished or run.final_accuracy is None:
            continue
        cfg = group_config(run)
        key = json.dumps(cfg, sort_keys=True, default=str) if run.config else f"<no config> {run.path}"
        groups.setdefault(key, SeedGroup(config=cfg)).runs.append(run)
    return list(groups.values())


def group_differing_keys(groups: Sequence[SeedGroup]) -> list[str]:
    """Keys (seed excluded) whose values differ across the groups; a key missing somewhere differs."""
    if len(groups) < 2:
        return []
    keys = sorted(set().union(*(g.config.keys() for g in groups)))

    def dumps(g: SeedGroup, k: str) -> str:
        return json.dumps(g.config.get(k, "<missing>"), sort_keys=True, default=str)

    return [k for k in keys if len({dumps(g, k) for g in groups}) > 1]


def reference_for(group: SeedGroup, groups: Sequence[SeedGroup]) -> SeedGroup | None:
    """The non-private group with the same population settings, if there is exactly one."""
    if not group.is_private:
        return None
    matches = [g for g in groups if not g.is_private and g.population() == group.population()]
    return matches[0] if len(matches) == 1 else None


def seed_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the seed-aggregated table, or None when no two runs differ only by seed.

    One row per group: its differing keys, the number of seeds, mean ± sample std and min..max of the
    final test accuracy, the largest published epsilon, and ``gap`` = mean - the matching non-private
    group's mean (see :func:`reference_for`; ``-`` when there is none or not exactly one)."""
    groups = group_by_seed(runs)
    if not any(len(g.runs) > 1 for g in groups):
        return None
    keys = group_differing_keys(groups)
    header = [*keys, "seeds", "acc_mean±std", "acc_min..max", "epsilon", "gap_vs_nonpriv"]
    rows = []
    for g in groups:
        accs = g.accuracies
        std = g.std
        eps = g.epsilon
        ref = reference_for(g, groups)
        rows.append([
            *(_cell(g.config.get(k)) for k in keys),
            str(len(accs)),
            f"{g.mean:.4f}" + (f"±{std:.4f}" if std is not None else ""),
            f"{min(accs):.4f}..{max(accs):.4f}",
            _cell(eps) if eps is not None else "none",
            f"{g.mean - ref.mean:+.4f}" if ref is not None else "-",
        ])
    return header, rows
