"""A real Flower federation on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

``scripts/deploy.py`` is the command line over this package (see ``docs/deployment.md``)::

    scripts/deploy.py run --nodes 3 --mode tls+auth -- privacy=central num_rounds=3   # up + run + down
    scripts/deploy.py up --nodes 3 --mode tls+auth     # start and leave running
    scripts/deploy.py run -- num_rounds=3              # a run on the running federation
    scripts/deploy.py status
    scripts/deploy.py down

What it does, in order: free ports; a session folder (logs, certificates, keys, the run's
outputs); TLS material made with ``cryptography`` (a CA and a server certificate for
``IP:127.0.0.1``) and ECDSA SuperNode keys; ``flower-superlink``; the connection in
``$FLWR_HOME/config.toml``; ``flwr supernode register`` for each key; one ``flower-supernode``
per client with ``--node-config "partition-id=i num-partitions=N"`` (or ``data-path=...``);
``flwr run <project> <connection> --stream`` with the Hydra overrides in the run-config key
``overrides``; the run's ``summary.json`` read back from its run folder; every process it started
stopped by PID (its process group and every descendant), also on Ctrl-C, SIGTERM and at
interpreter exit.

Each SuperNode gets its own ``FLWR_HOME`` (as it would on its own machine); the SuperLink and
the ``flwr`` CLI share the session's (or the given) ``FLWR_HOME``.

Modules: ``common`` (paths, modes, DeployError), ``certs`` (CA, server certificate, SuperNode
keys), ``processes`` (started processes, stopping them, signals, free ports; the process tree
itself is :mod:`fedpriv.proctree`), ``diagnosis`` (why a node stopped, from its log), ``faults``,
``federation`` (state, start, stop), ``overrides`` (the run's configuration), ``runner``
(``flwr run``, the result, the report), ``owner_data`` (``export-data``), ``cli``.
"""

from fedpriv.deploy.certs import make_ca, make_deployment_certs, make_node_key, make_server_cert
from fedpriv.deploy.cli import build_parser, main
from fedpriv.deploy.common import CONNECTION, DEFAULT_SESSIONS, HOST, MODES, PROJECT, DeployError, Echo, print_line
from fedpriv.deploy.diagnosis import diagnose, read_log
from fedpriv.deploy.faults import Fault, check_faults, schedule_kill
from fedpriv.deploy.federation import (
    Federation, check_outside_fab, child_env, flower_bin, node_config_string, start_federation, stop_federation,
    write_connection,
)
from fedpriv.deploy.overrides import check_overrides, compose, deployment_overrides, run_config_args
from fedpriv.deploy.owner_data import export_data
from fedpriv.deploy.processes import (
    Interrupted, Proc, Processes, descendants, free_ports, install_signal_handlers, pid_alive, port_open, signal_group,
)
from fedpriv.deploy.runner import RunResult, operator_view, report, run_app, watch_nodes

__all__ = [
    "CONNECTION", "DEFAULT_SESSIONS", "HOST", "MODES", "PROJECT",
    "DeployError", "Echo", "Fault", "Federation", "Interrupted", "Proc", "Processes", "RunResult",
    "build_parser", "check_faults", "check_outside_fab", "check_overrides", "child_env", "compose", "deployment_overrides",
    "descendants", "diagnose", "export_data", "flower_bin", "free_ports", "install_signal_handlers", "main",
    "make_ca", "make_deployment_certs", "make_node_key", "make_server_cert", "node_config_string", "operator_view",
    "pid_alive", "port_open", "print_line", "read_log", "report", "run_app", "run_config_args", "schedule_kill",
    "signal_group", "start_federation", "stop_federation", "watch_nodes", "write_connection",
]
