"""The run folder: one run's files, who may read them, and the rules that keep them honest.

Published (covered by the guarantee or public by construction, see
:mod:`fedpriv.privacy.disclosure`): ``config.yaml``, ``metrics.jsonl`` (one JSON line per finished
round), ``summary.json``, ``privacy.json`` (private runs), ``model.pt`` (the final model).
Operator-only: ``operator_only/`` (``diagnostics.jsonl``, ``privacy_details.json``,
``simulated_client_state/``, ``local_monitor.jsonl``) and ``checkpoint.pt``.

Rules:

* a folder holds one run: a new run refuses a folder that already holds one (its files would
  mix with the new run's, and a stale ``privacy.json`` would describe the wrong run);
* ``resume=true`` needs a folder holding a readable checkpoint of the same configuration (keys in
  :data:`RESUME_FREE_KEYS` may differ); anything else is refused *before* the folder is touched,
  because a resume that silently starts afresh spends the privacy budget a second time;
* a round is recorded (checkpoint, with the ledger) before anything about it is published; on
  resume, a round the checkpoint holds but ``metrics.jsonl`` lacks is published from the
  checkpoint, never trained again with fresh noise;
* a torn last line of a JSON-lines file (a crash mid-write) is dropped, not fatal.

JSON cannot hold infinities: an infinite float is written as the string ``"inf"`` (``"-inf"``),
NaN as ``null``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from fedpriv.config import RunConfig, to_dict
from fedpriv.durable import durable_write, durable_write_text
from fedpriv.errors import RunFolderError

log = logging.getLogger("fedpriv")

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PRIVACY = "privacy.json"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
OPERATOR_DIR = "operator_only"
DIAGNOSTICS = f"{OPERATOR_DIR}/diagnostics.jsonl"
PRIVACY_DETAILS = f"{OPERATOR_DIR}/privacy_details.json"
SIMULATED_CLIENT_STATE = f"{OPERATOR_DIR}/simulated_client_state"
# The local-DP monitor's per-client table (fedpriv.privacy.local_monitor): one line per round, appended and
# fsynced before the round is checkpointed; checkpoint.pt references it (round, line count).
LOCAL_MONITOR_JOURNAL = f"{OPERATOR_DIR}/local_monitor.jsonl"
# With exposure.secrets: the planted secrets' exposure in model.pt (fedpriv.audit.exposure); published.
EXPOSURE = "exposure.json"
# Written after the run by scripts/assess_risk.py (fedpriv.risk): membership-attack figures, raw.
RISK_ASSESSMENT = f"{OPERATOR_DIR}/risk_assessment.json"
# Files whose presence means a run already released something into the folder.
RUN_OUTPUTS = (METRICS, SUMMARY, PRIVACY, MODEL, CHECKPOINT, OPERATOR_DIR)
# Keys whose change does not change what a resumed run computes.
RESUME_FREE_KEYS = ("resume", "run_dir", "tracking", "round_timeout", "placement")


def jsonable(value: Any) -> Any:
    """``value`` with infinities as strings, NaN as None, numpy scalars as Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return jsonable(value.item())
    return value


# ---------------------------------------------------------------------------------- files


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically: a reader sees the old file or the new one, whole."""
    durable_write_text(path, json.dumps(jsonable(obj), indent=2, default=str) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One line, flushed to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn *last* line (a crash mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (the run stopped while writing it)", path)
                break
            raise RunFolderError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
    return records


def rewrite_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    durable_write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in records))


def keep_rounds_up_to(path: str | Path, last_round: int) -> list[dict[str, Any]]:
    """Drop lines after ``last_round`` (and a torn last line); returns what is kept."""
    path = Path(path)
    if not path.exists():
        return []
    kept = [r for r in read_jsonl(path) if int(r.get("round", 0)) <= last_round]
    rewrite_jsonl(path, kept)
    return kept


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / METRICS)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


# ------------------------------------------------------------------------------ checkpoint


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically and durably: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(run_dir) / CHECKPOINT
    durable_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint, None if there is none; :class:`RunFolderError` if it is unreadable."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise RunFolderError(f"cannot resume {run_dir}: {CHECKPOINT} is unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"round", "config", "arrays", "aggregator"} <= set(state):
        raise RunFolderError(f"cannot resume {run_dir}: {CHECKPOINT} is not a fedpriv checkpoint")
    return state


def config_diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, except :data:`RESUME_FREE_KEYS`."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        full = f"{prefix}{key}"
        if full.split(".")[0] in RESUME_FREE_KEYS:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, full + ".")
        elif a != b:
            diffs.append(full)
    return diffs


def check_run_folder(rc: RunConfig) -> dict[str, Any] | None:
    """Refuse a folder that cannot hold this run, before anything is written; returns the
    checkpoint to resume from (None for a new run)."""
    if rc.run_dir is None:
        raise RunFolderError("config key 'run_dir': the launcher must set the run's output folder")
    run_dir = Path(rc.run_dir)
    if not rc.resume:
        present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if present:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(present)}): a folder holds one run; "
                "choose another run_dir, or resume=true to continue that run"
            )
        return None
    if not run_dir.is_dir():
        raise RunFolderError(f"cannot resume: run folder {run_dir} does not exist (config key 'run_dir')")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        what = "is not a run folder" if not (run_dir / CONFIG).exists() else "holds no finished round to resume from"
        raise RunFolderError(f"cannot resume {run_dir}: it {what} (no {CHECKPOINT}); start a new run instead")
    diffs = config_diff(checkpoint["config"], to_dict(rc))
    if diffs:
        raise RunFolderError(f"cannot resume {run_dir}: these keys differ from the saved run: {', '.join(diffs)}")
    journal = (checkpoint.get("local_monitor") or {}).get("journal")  # the local-DP table, by reference
    if journal and not (run_dir / journal).is_file():
        raise RunFolderError(f"cannot resume {run_dir}: {journal} is missing; the checkpoint's local-DP table "
                             "(the clients' epsilons) is in it")
    return checkpoint


def write_config(rc: RunConfig) -> None:
    """``config.yaml``: the whole configuration of a new run (a resumed run keeps its own)."""
    path = Path(str(rc.run_dir)) / CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(rc), sort_keys=False))


def simulated_client_state_dir(run_dir: str | Path) -> Path:
    """Where the simulated clients keep their own ledgers (their 'disks'), absolute."""
    return (Path(run_dir) / SIMULATED_CLIENT_STATE).resolve()
