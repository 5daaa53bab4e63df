"""Local files in the run folder: metrics.jsonl (published, one line per round), the operator's
diagnostics file, and summary.json. The formats belong to :mod:`fedpriv.run_folder`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpriv import run_folder
from fedpriv.run_folder import read_metrics, read_summary

__all__ = ["LocalFiles", "read_metrics", "read_summary"]


class LocalFiles:
    """Appends each round's published record to ``metrics.jsonl`` and its operator-only part to
    ``operator_only/diagnostics.jsonl``; writes ``summary.json`` at the end.

    On resume, lines after the checkpoint's round are dropped from both first, so a round is
    never listed twice.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / run_folder.METRICS
        self.diagnostics_path = self.run_dir / run_folder.DIAGNOSTICS
        self.summary_path = self.run_dir / run_folder.SUMMARY

    def start(self, config: dict[str, Any], resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            for path in (self.metrics_path, self.diagnostics_path):
                if path.exists():
                    path.unlink()

    def truncate_after(self, last_round: int) -> None:
        for path in (self.metrics_path, self.diagnostics_path):
            run_folder.keep_rounds_up_to(path, last_round)

    def log_round(self, record: dict[str, Any], operator: dict[str, Any] | None = None) -> None:
        run_folder.append_jsonl(self.metrics_path, record)
        if operator:
            run_folder.append_jsonl(self.diagnostics_path, operator)

    def log_summary(self, summary: dict[str, Any]) -> None:
        run_folder.write_json(self.summary_path, summary)

    def finish(self) -> None:
        pass
