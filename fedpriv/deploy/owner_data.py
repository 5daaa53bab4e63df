"""Stand-ins for data owners' own files: each node's partition as ``node-<i>.npz`` (``export-data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpriv.deploy.common import Echo, print_line
from fedpriv.deploy.overrides import compose, deployment_overrides
from fedpriv.task import load_client_data


def export_data(num_nodes: int, out: Path, overrides: list[str], echo: Echo = print_line) -> list[Path]:
    """Write each node's partition as ``node-<i>.npz`` (x_train, y_train, x_val, y_val): stand-ins
    for data owners' own files, to try ``data-path=``."""
    rc = compose(deployment_overrides(list(overrides), num_nodes, out / "unused"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_nodes):
        d = load_client_data(rc, i, {"partition-id": i, "num-partitions": num_nodes})
        path = out / f"node-{i}.npz"
        np.savez(path, x_train=d.x_train, y_train=d.y_train, x_val=d.x_val, y_val=d.y_val)
        echo(f"deploy: wrote {path} ({len(d.x_train)} training rows, {len(d.x_val)} validation rows)")
        paths.append(path)
    return paths
