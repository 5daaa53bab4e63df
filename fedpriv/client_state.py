"""A client's own persistent state (its DP-SGD ledger), on its own disk, surviving any restart.

A client must never rely on the server, or on the process that happens to serve it, to know
what it has already spent: a ledger that restarts from zero after a crash under-reports the
client's epsilon and lets it train past its budget. So each client keeps its state in a
:class:`ClientStateStore`, a folder of small JSON files written atomically (write, fsync,
rename, fsync the folder) *before* the client's reply leaves it.

Where the folder is:

* on a real SuperNode, the node's ``--node-config`` key ``state-dir`` (default
  ``$FEDPRIV_CLIENT_STATE`` or ``~/.fedpriv/client-state``), one ledger per client across every
  run (nothing the server sends selects it), so a restarted SuperNode continues its ledger and
  keeps refusing rounds past its budget;
* in simulation, the folder the server names in the train message
  (``<run folder>/operator_only/simulated_client_state``): the virtual clients' disks. It is
  kept with the run and read again when the run resumes. It reveals which client took part in
  which round, so it is operator-only, like everything under ``operator_only/``.

Flower's ``context.state`` is not used for this: it belongs to a Flower node, which in
simulation serves many virtual clients and in deployment is lost when the SuperNode restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from fedpriv.durable import durable_write_text
from fedpriv.errors import ClientError

DEFAULT_STATE_DIR = Path.home() / ".fedpriv" / "client-state"
STATE_DIR_ENV = "FEDPRIV_CLIENT_STATE"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ClientStateError(ClientError):
    """A client's state file that cannot be read or written: the client must not train blind."""


def safe_name(key: str) -> str:
    """A file name for ``key``: readable where possible, always unique (hash suffix if changed)."""
    cleaned = _SAFE.sub("_", key)[:80]
    if cleaned == key:
        return key
    return f"{cleaned}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class ClientStateStore:
    """One folder of per-client JSON records; every write is atomic and durable.

    Args:
        directory: where the records live. Privacy meaning: it holds each client's ledger, i.e.
            which rounds the client trained in; it must be private to the client (or, in
            simulation, to the operator).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{safe_name(key)}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The record saved under ``key``, or None if the client has none yet."""
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClientStateError(f"cannot read client state {path}: {exc}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClientStateError(f"client state {path} is corrupt ({exc}); refusing to train without a ledger") from None
        if not isinstance(record, dict):
            raise ClientStateError(f"client state {path} is not a JSON object")
        return record

    def save(self, key: str, record: dict[str, Any]) -> None:
        """Write ``record`` so that a crash at any point leaves the old or the new one, whole."""
        try:
            durable_write_text(self.path(key), json.dumps(record, sort_keys=True))
        except OSError as exc:
            raise ClientStateError(f"cannot write client state in {self.directory}: {exc}") from None

    def keys(self) -> list[str]:
        """The file stems present (for inspection and tests)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))


def node_state_dir(node_config: dict[str, Any]) -> Path:
    """A SuperNode's state folder: ``state-dir`` from ``--node-config``, else the default.

    One ledger per client for every run it takes part in: the run id comes from the server, and a
    ledger keyed by it would let a server (or a restarted one that could not resume) start a fresh
    ledger; spend across runs over the same data composes anyway.
    """
    base = node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(str(base)).expanduser()
