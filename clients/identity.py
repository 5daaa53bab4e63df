"""Who a client is, stably: the key its ledger is kept under and the server's table uses.

A ledger keyed by anything that can shift (a node's position among the connected nodes, a
Flower node id that a restarted SuperNode does not keep) restarts when the fleet changes,
and the client's epsilon is then under-reported. The key comes from the client's side:

* simulation (``client_mode=virtual``): the virtual client the message names, ``client-<id>``
  (the id is fixed for the whole run by the partition);
* deployment (``client_mode=nodes``, one SuperNode is one client), from ``--node-config``:
  ``client-id`` when given (recommended), else ``partition-id`` (with ``num-partitions``),
  else a hash of ``data-path``: each depends on this node alone, never on the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fedpriv.errors import ClientError


class ClientIdentityError(ClientError, ValueError):
    """A SuperNode that names nothing stable to key its ledger by."""


def client_key(client_mode: str, message_client_id: int, node_config: dict[str, Any]) -> str:
    """The stable key of the client this process acts as (see the module's docstring)."""
    if client_mode == "virtual":
        return f"client-{int(message_client_id)}"
    if node_config.get("client-id") not in (None, ""):
        return f"node-{node_config['client-id']}"
    if "partition-id" in node_config:
        of = node_config.get("num-partitions")
        return f"partition-{int(node_config['partition-id'])}" + (f"-of-{int(of)}" if of is not None else "")
    if "data-path" in node_config:
        path = str(Path(str(node_config["data-path"])).expanduser().resolve())
        return f"data-{hashlib.sha256(path.encode()).hexdigest()[:16]}"
    raise ClientIdentityError(
        "this SuperNode's --node-config names no stable identity: give client-id=NAME, "
        "partition-id=I num-partitions=N, or data-path=\"/abs/file.npz\""
    )
