"""The simulation launcher's ServerApp: the configuration is handed over, already validated.

``fedpriv.simulation`` runs it with Flower's ``run_simulation``. The ServerApp that ``flwr run``
starts (a local simulation federation or deployment), which composes the run-config key
``overrides`` over ``conf/`` and preflights it, is :mod:`fedpriv.flwr_app`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.config import RunConfig
from fedpriv.federation import run_federation


def make_server_app(rc: RunConfig) -> ServerApp:
    """A ServerApp bound to an already validated configuration (the simulation path)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, rc)

    return server
