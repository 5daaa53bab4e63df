"""The ServerApp that ``flwr run`` starts (pyproject's ``serverapp`` component): a local simulation
federation (``python -m fedpriv.flwr_run``, or ``flwr run . <connection>`` by hand) and deployment
(``scripts/deploy.py``).

The run-config key ``overrides`` carries Hydra overrides, composed over ``conf/`` as
``scripts/simulate.py`` composes its command line, e.g.
``--run-config 'overrides="dataset=fashion_mnist num_rounds=5"'``. The composed configuration is
preflighted here as the simulation launcher does; a user error (a wrong key, missing data, an
impossible budget) ends the run at once with one line ``fedpriv: error: ...`` in the run's log,
never a traceback or a stalled run. Under a simulation federation the placement becomes Flower's
``--federation-config`` (:func:`federation_config`): the ServerApp can see how many simulated
SuperNodes there are, not their resources, so a different count is a one-line warning naming the
federation config that matches ``scripts/simulate.py``.

(The simulation launcher's ServerApp, with the configuration handed over, is
:func:`fedpriv.server_app.make_server_app`; this one lives apart because it preflights, and the
preflight imports the simulation launcher, which imports that module.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.compose import compose_config
from fedpriv.config import ConfigError, RunConfig
from fedpriv.engine import wait_for_nodes
from fedpriv.errors import UserError
from fedpriv.federation import run_federation
from fedpriv.launch import final_report
from fedpriv.logs import configure_logging
from fedpriv.preflight import preflight
from fedpriv.simulation import num_simulated_nodes

NODE_WAIT_S = 10.0  # how long to wait for the simulated SuperNodes to register before comparing their count

app = ServerApp()


def federation_config(rc: RunConfig) -> str:
    """``--federation-config`` for Flower's simulation runtime, equal to what ``scripts/simulate.py``
    sets (:func:`fedpriv.simulation.num_simulated_nodes`, :func:`fedpriv.simulation.backend_config`).

    Placement decides only resources and speed, never privacy. What the runtime cannot express is
    refused (a :class:`ConfigError` naming the key), not silently changed: its Ray is its own (no
    ``placement.address``), it has no object-store setting, and it takes whole CPUs per client.
    """
    pl = rc.placement
    if pl.address is not None or pl.name == "cluster":
        raise ConfigError(f"config key 'placement.address': {pl.address!r}: flwr run's simulation runtime starts its own "
                          "Ray and cannot join a cluster; allowed here: placement=cpu|gpu|multi_gpu (for a cluster use "
                          "scripts/simulate.py placement=cluster)")
    if pl.object_store_memory is not None:
        raise ConfigError("config key 'placement.object_store_memory': flwr run's simulation runtime has no object-store "
                          "setting; allowed here: null (or use scripts/simulate.py)")
    if pl.num_cpus_per_client != int(pl.num_cpus_per_client) or pl.num_cpus_per_client < 1:
        raise ConfigError(f"config key 'placement.num_cpus_per_client': {pl.num_cpus_per_client:g}: flwr run's simulation "
                          "runtime takes whole CPUs per client; allowed here: 1, 2, ... (fractions: scripts/simulate.py)")
    parts = [f"num-supernodes={num_simulated_nodes(rc)}", f"client-resources-num-cpus={int(pl.num_cpus_per_client)}",
             f"client-resources-num-gpus={float(pl.num_gpus_per_client)}"]
    if pl.num_cpus is not None:
        parts.append(f"init-args-num-cpus={int(pl.num_cpus)}")
    if pl.num_gpus is not None:
        parts.append(f"init-args-num-gpus={int(pl.num_gpus)}")
    return " ".join(parts)


def prepare(run_config: dict[str, Any], run_id: int) -> tuple[RunConfig, list[str]]:
    """The composed, preflighted configuration of ``run_config["overrides"]`` and its warnings."""
    rc = compose_config(str(run_config.get("overrides", "")))
    if rc.run_dir is None:  # relative to the SuperLink's working directory: made absolute, and printed
        rc.run_dir = str(Path("outputs") / "flwr" / f"run-{run_id}-{time.strftime('%Y%m%d-%H%M%S')}")
    rc.run_dir = str(Path(rc.run_dir).expanduser().resolve())
    if rc.client_mode == "virtual":
        federation_config(rc)  # refuses a placement Flower's simulation runtime cannot honour
    return rc, preflight(rc)


def check_nodes(grid: Grid, rc: RunConfig) -> str | None:
    """A warning if the simulation federation's SuperNodes differ from ``scripts/simulate.py``'s count
    (results are the same, since any node serves any client; the speed is not)."""
    want = num_simulated_nodes(rc)
    have = len(wait_for_nodes(grid, want, NODE_WAIT_S))
    if have == want:
        return None
    return (f"the federation simulates {have} SuperNodes where scripts/simulate.py uses {want} for this placement (one per "
            f"client worker); results are the same, the speed is not: pass --federation-config \"{federation_config(rc)}\" "
            "or run python -m fedpriv.flwr_run")


def serve(grid: Grid, run_config: dict[str, Any], run_id: int) -> dict[str, Any] | None:
    """One run; a user error is one line ``fedpriv: error: ...`` and ends it (returns None)."""
    try:
        rc, warnings = prepare(run_config, run_id)
    except (UserError, ValueError) as exc:  # as the simulation launcher refuses them (fedpriv.launch)
        print(f"fedpriv: error: {exc}", flush=True)
        return None
    if rc.client_mode == "virtual":
        warnings += [w for w in [check_nodes(grid, rc)] if w]
    for warning in warnings:
        print(f"fedpriv: warning: {warning}", flush=True)
    print(f"fedpriv: writing the run to {rc.run_dir}", flush=True)
    try:
        summary = run_federation(grid, rc)
    except UserError as exc:  # e.g. a budget refused at the start of the run
        print(f"fedpriv: error: {exc}", flush=True)
        return None
    print(final_report(summary, rc), flush=True)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging(flower_level="WARNING")
    serve(grid, dict(context.run_config), int(context.run_id))
