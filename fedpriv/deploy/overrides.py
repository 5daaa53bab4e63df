"""The run's configuration: the launcher's Hydra overrides, their preflight, ``--run-config``."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from fedpriv.compose import compose_config
from fedpriv.config import ConfigError, RunConfig, explicit_keys
from fedpriv.deploy.common import DeployError
from fedpriv.errors import UserError
from fedpriv.logs import configure_logging
from fedpriv.preflight import preflight


def run_config_args(overrides: str, scratch: Path) -> list[str]:
    """``--run-config`` for ``overrides="<hydra overrides>"``.

    ``flwr run`` splits ``--run-config`` on ``key=value`` pairs whose value may be quoted with
    "..." or '...' (then parsed as TOML). Overrides containing both quote kinds go through a
    TOML file instead.
    """
    if '"' not in overrides and "\\" not in overrides:
        return ["--run-config", f'overrides="{overrides}"']
    if "'" not in overrides:
        return ["--run-config", f"overrides='{overrides}'"]
    path = scratch / "run-config.toml"
    path.write_text(tomli_w.dumps({"overrides": overrides}))
    return ["--run-config", str(path)]


def deployment_overrides(user: list[str], num_nodes: int, run_dir: Path) -> list[str]:
    """The launcher's overrides (one client per node, the run folder) followed by the user's."""
    keys = explicit_keys(user)
    mine = ["client_mode=nodes", f"num_clients={num_nodes}"]
    if "clients_per_round" not in keys:
        mine.append(f"clients_per_round={num_nodes}")
    if "run_dir" not in keys:
        mine.append(f"run_dir={run_dir}")
    out = []
    for o in user:
        if explicit_keys([o]) == {"run_dir"} and "=" in o:
            o = f"run_dir={Path(o.split('=', 1)[1]).expanduser().resolve()}"
        out.append(o)
    return [o for o in mine if o.split("=", 1)[0] not in keys] + out


def compose(overrides: list[str]) -> RunConfig:
    """``conf/`` composed with ``overrides``; a bad override is a one-line :class:`DeployError`."""
    try:
        return compose_config(overrides)
    except ConfigError as exc:
        raise DeployError(f"configuration: {exc}") from None


def check_overrides(overrides: list[str], num_nodes: int) -> RunConfig:
    """Compose and preflight the configuration here, before anything starts (one-line errors)."""
    rc = compose(overrides)
    if rc.client_mode != "nodes":
        raise DeployError("client_mode must be nodes under the deployment launcher (one SuperNode = one client)")
    if rc.num_clients != num_nodes:
        raise DeployError(f"num_clients={rc.num_clients} but the federation has {num_nodes} SuperNodes: one SuperNode is one client")
    configure_logging()  # strategy warnings belong to the run's log
    try:
        warnings = preflight(rc)  # data present, model builds, privacy plan feasible
    except (ConfigError, UserError, ValueError) as exc:
        raise DeployError(f"configuration: {exc}") from None
    for warning in warnings:
        print(f"deploy: warning: {warning}", flush=True)
    return rc

