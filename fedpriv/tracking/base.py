"""The one small interface every tracking backend implements."""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    """``log_round`` gets the round's published record and, apart, its operator-only diagnostics
    (:mod:`fedpriv.privacy.disclosure`); a tracker that publishes must not pass the latter on
    unless the user opted in."""

    def start(self, config: dict[str, Any], resumed: bool) -> None: ...

    def log_round(self, record: dict[str, Any], operator: dict[str, Any] | None = None) -> None: ...

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class Trackers:
    """Fans every call out to several trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def start(self, config: dict[str, Any], resumed: bool = False) -> None:
        for t in self.trackers:
            t.start(config, resumed)

    def log_round(self, record: dict[str, Any], operator: dict[str, Any] | None = None) -> None:
        for t in self.trackers:
            t.log_round(record, operator)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_summary(summary)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves (an empty dict is kept as ``{}``)."""
    flat: dict[str, Any] = {}
    if isinstance(config, dict):
        if not config and prefix:
            flat[prefix[:-1]] = {}
        for key, value in config.items():
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    flat[prefix[:-1]] = config
    return flat
