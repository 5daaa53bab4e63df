"""The Run record: one run's flat config, per-round records and summary, and the figures read from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        return self._last_value("epsilon")

    @property
    def local_epsilon(self) -> float | None:
        return self._last_value("local_epsilon_max")

    @property
    def is_private(self) -> bool:
        return self.privacy_mode != "none" or self.epsilon is not None or self.local_epsilon is not None

    def _last_value(self, key: str) -> float | None:
        """``key`` from the summary, else from the last round that has it."""
        value = as_float(self.summary.get(key))
        if value is None:
            per_round = [v for v in (as_float(r.get(key)) for r in self.rounds) if v is not None]
            value = per_round[-1] if per_round else None
        return value


def as_float(value: Any) -> float | None:
    """Numbers and the strings LocalFiles writes for infinities; None for anything else (and NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x
