"""Find runs under the given paths (fedpriv run folders, W&B offline runs) and load each into a Run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from fedpriv.compare.record import Run
from fedpriv.compare.table import label_runs
from fedpriv.run_folder import CONFIG, METRICS, SUMMARY, read_metrics, read_summary
from fedpriv.tracking.base import flatten_config
from fedpriv.tracking.wandb_offline import is_offline_run_folder, read_offline_run


def is_run_folder(path: Path) -> bool:
    return (path / SUMMARY).is_file() or (path / METRICS).is_file()


def load_fedpriv_run(path: Path) -> Run:
    """``config.yaml`` (or Hydra's ``.hydra/config.yaml``), ``metrics.jsonl`` and ``summary.json``."""
    run = Run(path=path, source="fedpriv")
    cfg_file = path / CONFIG
    if not cfg_file.exists() and (path / ".hydra" / "config.yaml").exists():
        cfg_file = path / ".hydra" / "config.yaml"
    if cfg_file.exists():
        loaded = yaml.safe_load(cfg_file.read_text()) or {}
        if isinstance(loaded, dict):
            loaded.pop("hydra", None)
            run.config = flatten_config(loaded)
    run.rounds = read_metrics(path)  # a torn last line of a killed run is dropped
    if (path / SUMMARY).exists():
        run.summary = read_summary(path)
    return run


def load_wandb_offline_run(path: Path) -> Run:
    """A W&B offline run folder, read from its ``.wandb`` log (see :mod:`fedpriv.tracking.wandb_offline`)."""
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


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """All runs under ``paths`` (deduplicated, labelled) and notes about what was skipped.

    A path is a run folder, a folder holding run folders at any depth (a Hydra multirun), a W&B
    offline run folder (``wandb/offline-run-*``, or an online run's local ``wandb/run-*``) or its
    ``.wandb`` file. A fedpriv run folder's own ``wandb/`` sub-folder is not listed a second time.
    """
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
        if is_offline_run_folder(p):
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
    label_runs(runs)
    return runs, notes
