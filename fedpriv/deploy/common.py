"""What every part of the launcher shares: paths, the connection name, modes, DeployError, echo."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fedpriv.errors import UserError

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_SESSIONS = PROJECT / "outputs" / "deploy"
CONNECTION = "fedpriv-local"
MODES = ("insecure", "tls", "tls+auth")
HOST = "127.0.0.1"

Echo = Callable[[str], None]


class DeployError(UserError):
    """A problem the user can act on; printed as one line."""


def print_line(line: str) -> None:
    """The default ``echo``: one line on stdout, flushed."""
    print(line, flush=True)
