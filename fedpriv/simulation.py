"""Launch a run on Flower's simulation engine (Ray), with placement mapped to Ray resources."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation as flower_run_simulation

from fedpriv import run_folder
from fedpriv.client_app import app as client_app
from fedpriv.config import ConfigError, PlacementConfig, RunConfig
from fedpriv.server_app import make_server_app


def visible_gpus() -> int:
    """GPUs this machine shows to CUDA (0 without a driver)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def check_cluster_address(address: str, timeout: float = 5.0) -> None:
    """An explicit ``host:port`` of a Ray head that answers; never ``auto``, which would join
    whatever cluster runs on this machine, perhaps another program's."""
    if address == "auto" or ":" not in address:
        raise ConfigError(f"config key 'placement.address': {address!r}; give the Ray head's HOST:PORT (the address "
                          "`ray start --head` prints), so that a run never joins another program's cluster")
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key 'placement.address': no Ray head answers at {address} within {timeout:g} s "
                          f"({type(exc).__name__}); start it with `ray start --head` or fix the address") from None


def check_placement(pl: PlacementConfig, gpus_available: int | None = None) -> None:
    """Refuse, before Ray starts, a placement this machine cannot host: GPUs it does not have, a
    client actor larger than the machine (Ray would idle every round until the timeout), or a
    cluster address that is implicit or does not answer."""
    gpus = visible_gpus() if gpus_available is None else gpus_available
    if pl.name == "cluster" or pl.address is not None:
        check_cluster_address(str(pl.address or "auto"))
        return  # an existing cluster: its CPUs and GPUs are not ours to count
    cpus = pl.num_cpus or os.cpu_count() or 1
    if pl.num_cpus_per_client > cpus:
        raise ConfigError(f"config key 'placement.num_cpus_per_client': {pl.num_cpus_per_client:g} CPUs per client, "
                          f"but Ray has {cpus} here: no client could ever run; allowed: at most {cpus}")
    wants_gpu = pl.num_gpus_per_client > 0 or pl.server_device == "cuda"
    if wants_gpu and gpus == 0:
        raise ConfigError(
            f"config key 'placement' ({pl.name}): asks for GPUs (num_gpus_per_client={pl.num_gpus_per_client}, "
            f"server_device={pl.server_device}) but this machine has none; use placement=cpu"
        )
    if pl.num_gpus is not None and pl.num_gpus > gpus:
        raise ConfigError(f"config key 'placement.num_gpus': {pl.num_gpus} requested, {gpus} visible")


def backend_config(pl: PlacementConfig) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources and ``ray.init`` arguments."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "error", "log_to_driver": True}
    if pl.address is not None:
        init_args["address"] = pl.address
    else:
        if pl.num_cpus is not None:
            init_args["num_cpus"] = pl.num_cpus
        if pl.num_gpus is not None:
            init_args["num_gpus"] = pl.num_gpus
        if pl.object_store_memory is not None:
            init_args["object_store_memory"] = pl.object_store_memory
    return {
        "client_resources": {"num_cpus": pl.num_cpus_per_client, "num_gpus": pl.num_gpus_per_client},
        "init_args": init_args,
    }


def concurrent_clients(pl: PlacementConfig, cpus: int | None = None, gpus: int | None = None) -> int:
    """How many client actors Ray can run at once on this machine for this placement."""
    cpus = pl.num_cpus or cpus or os.cpu_count() or 1
    n = math.floor(cpus / pl.num_cpus_per_client + 1e-9)
    if pl.num_gpus_per_client > 0:
        g = pl.num_gpus if pl.num_gpus is not None else (gpus if gpus is not None else visible_gpus())
        n = min(n, math.floor(g / pl.num_gpus_per_client + 1e-9))
    return max(n, 0)


def num_simulated_nodes(rc: RunConfig) -> int:
    """Flower nodes to register: one per worker (Ray actor that can run at once), never one per client.

    Each round sends every worker one message with its share of the cohort (:mod:`clients.cohort`),
    so more nodes than workers would only queue; Flower's engine also does work per registered node
    on every poll. ``placement.num_nodes`` overrides (e.g. for a remote cluster's size).
    """
    if rc.placement.num_nodes is not None:
        return max(1, min(rc.placement.num_nodes, rc.num_clients))
    return max(1, min(concurrent_clients(rc.placement), rc.num_clients))


def run_simulation(rc: RunConfig) -> dict[str, Any]:
    """Run ``rc`` on Flower's simulation engine; returns the summary the run wrote."""
    check_placement(rc.placement)
    assert rc.run_dir is not None
    run_dir = Path(rc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / run_folder.SUMMARY
    if summary_path.exists():  # a resumed run writes its summary again
        summary_path.unlink()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flower_run_simulation(
        server_app=make_server_app(rc),
        client_app=client_app,
        num_supernodes=num_simulated_nodes(rc),
        backend_name="ray",
        backend_config=backend_config(rc.placement),
    )
    if not summary_path.exists():
        raise RuntimeError(f"the run stopped before writing {summary_path}; see the log above")
    return run_folder.read_summary(run_dir)
