"""The ServerApp: composes the run's configuration and runs fedpriv's round loop.

Under ``flwr run`` the run-config key ``overrides`` carries Hydra overrides (for example
``--run-config 'overrides="dataset=fashion_mnist num_rounds=5"'``), composed over ``conf/``.
Under the simulation launcher the configuration is handed over directly.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.compose import compose_config
from fedpriv.config import RunConfig
from fedpriv.federation import run_federation
from fedpriv.logs import configure_logging


def make_server_app(rc: RunConfig) -> ServerApp:
    """A ServerApp bound to an already validated configuration (the simulation path)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, rc)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployment path: ``flwr run . <federation>``."""
    configure_logging(flower_level="WARNING")
    overrides = str(context.run_config.get("overrides", ""))
    rc = compose_config(overrides)
    if rc.run_dir is None:
        rc.run_dir = str(Path("outputs") / "flwr" / f"run-{context.run_id}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"fedpriv: writing the run to {Path(rc.run_dir).resolve()}", flush=True)
    run_federation(grid, rc)
