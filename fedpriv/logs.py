"""Logging, configured in one place: fedpriv's own lines readable, libraries' chatter quiet.

Flower's deprecation notices and per-round INFO lines, Ray's future-warnings, alembic's start-up
lines and httpx's one line per request would bury fedpriv's own; only their errors (Flower: its
warnings too, with ``flower_level="WARNING"`` where the operator reads the ServerApp's log) stay.
"""

from __future__ import annotations

import logging
import os
import warnings

import flwr.common.logger  # noqa: F401  (importing it sets the "flwr" logger to DEBUG: it must come first)


def _not_evaluation_skipped(record: logging.LogRecord) -> bool:
    """fedpriv evaluates centrally by design; Flower's notice that it skips federated evaluation is noise."""
    return "Federated evaluation will be skipped" not in str(record.msg)


def configure_logging(flower_level: str = "ERROR") -> None:
    """fedpriv at INFO on stderr; Flower at ``flower_level``; the other libraries at WARNING."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(flower_level)
    if _not_evaluation_skipped not in flwr_logger.filters:
        flwr_logger.addFilter(_not_evaluation_skipped)
    for name in ("alembic", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
