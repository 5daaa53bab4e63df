"""One local federation: its state, start (SuperLink, registrations, SuperNodes) and stop."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import tomli
import tomli_w

from fedpriv.deploy.certs import make_ca, make_node_key, make_server_cert
from fedpriv.deploy.common import CONNECTION, DEFAULT_SESSIONS, HOST, MODES, PROJECT, DeployError, Echo, print_line
from fedpriv.deploy.diagnosis import diagnose, read_log
from fedpriv.deploy.faults import Fault, check_faults
from fedpriv.deploy.processes import Proc, Processes, free_ports, port_open


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (else from PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"cannot find the `{name}` command (install flwr in this environment)")
    return found


def child_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Optional[Path]) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = tomli.loads(path.read_text()) if path.exists() else {}
    superlink = data.setdefault("superlink", {})
    superlink.setdefault("default", name)
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = conn
    path.write_text(tomli_w.dumps(data))
    return path


def node_config_string(index: int, num_nodes: int, data_path: Optional[str] = None,
                       state_dir: Optional[str] = None) -> str:
    """``--node-config`` for node ``index``; values are TOML, so a path is quoted.

    ``state-dir`` is where the client keeps its own DP-SGD ledger (one ledger across runs); a
    restarted SuperNode with the same ``state-dir`` continues it (default ``~/.fedpriv/client-state``).
    """
    cfg = f"data-path={json.dumps(str(data_path))}" if data_path is not None else f"partition-id={index} num-partitions={num_nodes}"
    if state_dir is not None:
        cfg += f" state-dir={json.dumps(str(state_dir))}"
    return cfg


@dataclass
class Federation:
    """One local federation; its state is saved as ``<session>/state.json``."""

    session: str
    flwr_home: str
    mode: str
    num_nodes: int
    port: int
    connection: str = CONNECTION
    project: str = str(PROJECT)
    ca: Optional[str] = None
    node_configs: list[str] = field(default_factory=list)
    node_ids: list[Optional[int]] = field(default_factory=list)
    nodes: list[Proc] = field(default_factory=list)
    superlink: Optional[Proc] = None
    refused: list[str] = field(default_factory=list)
    runs: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def procs(self) -> list[Proc]:
        return [p for p in [*self.nodes, self.superlink] if p is not None]

    def env(self) -> dict[str, str]:
        return child_env(Path(self.flwr_home))

    def save(self) -> None:
        state = asdict(self)
        Path(self.session, "state.json").write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, session: Path) -> "Federation":
        state = json.loads((Path(session) / "state.json").read_text())
        state["nodes"] = [Proc(**p) for p in state["nodes"]]
        state["superlink"] = Proc(**state["superlink"]) if state.get("superlink") else None
        return cls(**state)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this federation's connection."""
        try:
            return subprocess.run(
                [flower_bin("flwr"), *args], env=self.env(), cwd=self.project, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise DeployError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None

    def alive_nodes(self) -> list[Proc]:
        return [p for p in self.nodes if p.alive()]


def start_federation(
    num_nodes: int,
    mode: str = "tls+auth",
    session: Optional[Path] = None,
    flwr_home: Optional[Path] = None,
    data_paths: Optional[list[str]] = None,
    faults: Iterable[Fault] = (),
    owner: Optional[Processes] = None,
    timeout: float = 120.0,
    echo: Echo = print_line,
) -> tuple[Federation, Processes]:
    """Start a SuperLink and ``num_nodes`` SuperNodes; returns once every SuperNode is connected.

    A SuperNode the SuperLink refuses (certificate, key) is reported in one line and left out
    (``Federation.refused``); the caller decides whether to go on. On any other failure every
    process started so far is stopped and ``DeployError`` is raised.
    """
    if mode not in MODES:
        raise DeployError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if num_nodes < 1:
        raise DeployError(f"--nodes must be at least 1, got {num_nodes}")
    if data_paths is not None and len(data_paths) != num_nodes:
        raise DeployError(f"{len(data_paths)} data paths for {num_nodes} nodes: give one --data-path per node")
    for path in data_paths or []:
        if not Path(path).is_file():
            raise DeployError(f"--data-path {path}: no such file")
    faults = list(faults)
    check_faults(faults, num_nodes, mode)

    session = Path(session or DEFAULT_SESSIONS / time.strftime("%Y%m%d-%H%M%S")).resolve()
    check_outside_fab(session)
    session.mkdir(parents=True, exist_ok=True)
    home = Path(flwr_home).resolve() if flwr_home else session / "flwr-home"
    if flwr_home is not None:
        check_outside_fab(home)
    owner = owner or Processes()

    (port,) = free_ports(1)
    fed = Federation(str(session), str(home), mode, num_nodes, port)
    echo(f"deploy: session {session} (mode {mode}, {num_nodes} SuperNodes, FLWR_HOME={home})")

    # TLS material and keys
    tls_args: list[str] = ["--insecure"]
    ca_path: Optional[Path] = None
    if mode != "insecure":
        certs = session / "certs"
        ca_path, ca_key = make_ca(certs)
        server_cert, server_key = make_server_cert(certs, ca_path, ca_key, [HOST, "localhost"])
        tls_args = ["--ssl-ca-certfile", str(ca_path), "--ssl-certfile", str(server_cert), "--ssl-keyfile", str(server_key)]
        fed.ca = str(ca_path)
    write_connection(home, fed.connection, fed.address, ca_path)

    try:
        # SuperLink
        cmd = [flower_bin("flower-superlink"), *tls_args, "--disable-runtime-dependency-installation", "--host", HOST, "--port", str(port)]
        if mode == "tls+auth":
            cmd.append("--enable-supernode-auth")
        fed.superlink = owner.start("superlink", cmd, session / "superlink.log", fed.env(), session)
        fed.save()

        # SuperNodes: node-config, trust, keys
        kinds = {(f.kind, f.node) for f in faults}
        wrong_ca: Optional[Path] = None
        if any(k == "wrong-ca" for k, _ in kinds):
            wrong_ca, _ = make_ca(session / "certs" / "wrong-ca", name="some other CA")
        node_ports = free_ports(num_nodes)
        commands, public_keys = [], []
        for i in range(num_nodes):
            name = f"node-{i}"
            data_path = str(Path(data_paths[i]).resolve()) if data_paths else None
            state_dir = str(session / "nodes" / name / "client-state")  # the node's own ledger, kept across restarts
            cfg = node_config_string(i, num_nodes, data_path, state_dir)
            if ("no-data", i) in kinds:
                cfg = ""
            if ("bad-data", i) in kinds:
                bad = session / f"{name}-unreadable.npz"
                bad.write_bytes(b"this is not an npz file\n")
                cfg = node_config_string(i, num_nodes, str(bad), state_dir)
            fed.node_configs.append(cfg)
            fed.node_ids.append(None)
            args = ["--insecure"]
            if mode != "insecure":
                args = ["--root-certificates", str(wrong_ca if ("wrong-ca", i) in kinds else ca_path)]
            if mode == "tls+auth":
                priv, pub = make_node_key(session / "keys", name)
                args += ["--auth-supernode-private-key", str(priv)]
                if ("unregistered", i) not in kinds:
                    public_keys.append((i, pub))
            cmd = [flower_bin("flower-supernode"), *args, "--superlink", fed.address, "--port", str(node_ports[i])]
            if cfg:
                cmd += ["--node-config", cfg]
            commands.append(cmd)

        def start_nodes() -> None:
            for i, cmd in enumerate(commands):
                node_home = session / "nodes" / f"node-{i}"
                node_home.mkdir(parents=True, exist_ok=True)
                env = child_env(node_home / "flwr-home")
                fed.nodes.append(owner.start(f"node-{i}", cmd, node_home / "supernode.log", env, node_home))
            fed.save()

        if mode == "tls+auth":  # keys must be registered before a SuperNode connects
            _wait_superlink(fed, owner, timeout)
            echo(f"deploy: SuperLink pid {fed.superlink.pid} on {fed.address}")
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(public_keys)))) as pool:
                ids = list(pool.map(lambda ip: _register(fed, ip[1]), public_keys))
            for (i, pub), node_id in zip(public_keys, ids):
                fed.node_ids[i] = node_id
            echo(f"deploy: registered {len(ids)} SuperNode public keys (flwr supernode register)")
            start_nodes()
        else:  # SuperNodes retry until the SuperLink listens: start everything at once
            start_nodes()
            _wait_superlink(fed, owner, timeout)
            echo(f"deploy: SuperLink pid {fed.superlink.pid} on {fed.address}")
        _wait_nodes(fed, owner, timeout, echo)
        fed.save()
        return fed, owner
    except BaseException:
        owner.stop()
        fed.save()
        raise


def check_outside_fab(path: Path) -> None:
    """``flwr run`` packs every .py/.yaml/.json/.md under the project that .gitignore does not
    exclude: session folders inside the project must be under ``outputs/`` (ignored)."""
    path = path.resolve()
    if path.is_relative_to(PROJECT) and not path.is_relative_to(PROJECT / "outputs"):
        raise DeployError(
            f"{path} is inside the project but not under outputs/: `flwr run` would pack its files into the app bundle; "
            "choose a folder outside the project or under outputs/"
        )


def _wait_superlink(fed: Federation, owner: Processes, timeout: float) -> None:
    assert fed.superlink is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if owner.returncode(fed.superlink) is not None:
            raise DeployError(f"the SuperLink exited: {diagnose(read_log(fed.superlink.log))} (log: {fed.superlink.log})")
        if port_open(fed.port):
            return
        time.sleep(0.3)
    raise DeployError(f"the SuperLink did not listen on {fed.address} within {timeout:.0f} s (log: {fed.superlink.log})")


def _register(fed: Federation, pub: Path) -> int:
    """``flwr supernode register <pub> <connection>``; returns the node id."""
    last = ""
    for _ in range(5):  # the Control API may need a moment after the port opens
        res = fed.flwr("supernode", "register", str(pub), fed.connection, "--format", "json")
        try:
            out = json.loads(res.stdout[res.stdout.find("{") :])
            if out.get("success"):
                return int(out["node-id"])
            last = str(out.get("error-message") or out)
        except (ValueError, KeyError):
            last = (res.stdout + res.stderr).strip().splitlines()[-1:] or ["no output"]
            last = last[0]
        time.sleep(1.0)
    raise DeployError(f"flwr supernode register {pub.name} failed: {last}")


def _wait_nodes(fed: Federation, owner: Processes, timeout: float, echo: Echo) -> None:
    """Until every SuperNode logged its node id, or exited (a refusal: one line each)."""
    pending = {p.name: p for p in fed.nodes}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, proc in list(pending.items()):
            text = read_log(proc.log)
            m = re.search(r"SuperNode ID: (\d+)", text)
            if m:
                i = fed.nodes.index(proc)
                fed.node_ids[i] = int(m.group(1))
                echo(f"deploy: {name} pid {proc.pid} connected (node id {m.group(1)}, node-config: {fed.node_configs[i] or '(none)'})")
                del pending[name]
            elif owner.returncode(proc) is not None:
                reason = diagnose(text)
                fed.refused.append(name)
                echo(f"deploy: {name} REFUSED: {reason} (log: {proc.log})")
                del pending[name]
        time.sleep(0.3)
    for name, proc in pending.items():
        owner.stop([proc], grace=5)
        fed.refused.append(name)
        echo(f"deploy: {name} did not connect within {timeout:.0f} s: {diagnose(read_log(proc.log))} (log: {proc.log})")


def stop_federation(fed: Federation, owner: Processes, echo: Echo = print_line) -> None:
    """SuperNodes first (they sign off), then the SuperLink; everything by PID."""
    nodes = [p for p in fed.nodes if p.alive()]
    forced = owner.stop(nodes) if nodes else []
    if fed.superlink is not None and fed.superlink.alive():
        forced += owner.stop([fed.superlink])
    owner.stop()  # anything else this owner still holds
    left = [p for p in fed.procs if p.alive()]
    note = f" (SIGKILL needed for {', '.join(forced)})" if forced else ""
    if left:
        echo(f"deploy: WARNING: still running: {', '.join(f'{p.name} pid {p.pid}' for p in left)}")
    else:
        echo(f"deploy: stopped the SuperLink and {len(fed.nodes)} SuperNodes{note}; logs in {fed.session}")

