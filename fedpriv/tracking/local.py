"""Local files in the run folder: metrics.jsonl (one JSON object per round) and summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


class LocalFiles:
    """Appends each round to ``metrics.jsonl``; writes ``summary.json`` at the end.

    On resume, rounds after the checkpoint's round are dropped from ``metrics.jsonl`` first,
    so a round is never listed twice.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"

    def start(self, config: dict[str, Any], resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed and self.metrics_path.exists():
            self.metrics_path.unlink()

    def truncate_after(self, last_round: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [r for r in read_metrics(self.run_dir) if r.get("round", 0) <= last_round]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log_round(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.summary_path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")

    def finish(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
