"""A real Flower federation on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

``scripts/deploy.py`` is the command line over this module (see ``docs/deployment.md``)::

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
``overrides``; the run's ``summary.json`` read back; every process it started stopped by PID
(its process group and every descendant), also on Ctrl-C, SIGTERM and at interpreter exit.

Each SuperNode gets its own ``FLWR_HOME`` (as it would on its own machine); the SuperLink and
the ``flwr`` CLI share the session's (or the given) ``FLWR_HOME``.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from fedpriv.errors import UserError

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_SESSIONS = PROJECT / "outputs" / "deploy"
CONNECTION = "fedpriv-local"
MODES = ("insecure", "tls", "tls+auth")
HOST = "127.0.0.1"

Echo = Callable[[str], None]


class DeployError(UserError):
    """A problem the user can act on; printed as one line."""


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) arrived: unwind and clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _echo(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# TLS certificates and SuperNode keys (the ``cryptography`` package)
# --------------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_ca(out: Path, name: str = "fedpriv federation CA", days: int = 30) -> tuple[Path, Path]:
    """A self-signed CA (ECDSA P-256): ``<out>/ca.pem`` and ``<out>/ca.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def make_server_cert(out: Path, ca_cert: Path, ca_key: Path, hosts: Iterable[str] = (HOST,), days: int = 30) -> tuple[Path, Path]:
    """The SuperLink's certificate signed by the CA, with a SAN for every host (IP or DNS name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise DeployError("the server certificate needs at least one host name or IP address")
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = out / "server.pem", out / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return priv, pub


# --------------------------------------------------------------------------------------------
# Processes: start in their own session, find every descendant, stop them all by PID
# --------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> Optional[tuple[str, int, int, int]]:
    """(state, ppid, pgid, start time in clock ticks) from /proc, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """True if ``pid`` runs (zombies count as gone) and, if given, started at ``start``."""
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start is None or st[3] == start


def _all_processes() -> dict[int, tuple[str, int, int, int]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    return table


def descendants(roots: dict[int, int]) -> set[int]:
    """Every live process below ``roots`` (``pid -> start time``), by parent PID or by process group.

    A root that already exited still counts: the members of its process group (started after it)
    are found by group id, and so are the members of any group a descendant leads (Flower's
    SuperLink starts its SuperExec in a new session).
    """
    table = _all_processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r, start in roots.items() if r in table and table[r][3] == start]
    groups = dict(roots)  # group id -> start time of its leader
    while True:
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if child not in found and child not in roots:
                    found.add(child)
                    todo.append(child)
        for pid in found:
            if table[pid][2] == pid:
                groups.setdefault(pid, table[pid][3])
        members = {
            pid for pid, st in table.items()
            if st[2] in groups and st[3] >= groups[st[2]] and pid not in roots and pid not in found
        }
        if not members:
            break
        found |= members
        todo = list(members)
    return {p for p in found if table[p][0] not in ("Z", "X")}


@dataclass
class Proc:
    """A process this launcher started (the root of its own process group)."""

    name: str
    pid: int
    start: int  # /proc start time, to never signal a recycled PID
    log: str
    cmd: list[str]

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start)


class Processes:
    """The processes one launcher owns; stops them all (descendants included), once."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.popens: dict[int, subprocess.Popen] = {}
        self.seen: set[int] = set()  # every PID ever seen below our roots (for checks)
        self._lock = threading.Lock()

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=str(cwd), start_new_session=True,
            )
        st = _proc_stat(popen.pid)
        proc = Proc(name, popen.pid, st[3] if st else 0, str(log), cmd)
        with self._lock:
            self.procs.append(proc)
            self.popens[proc.pid] = popen
        return proc

    def adopt(self, procs: Iterable[Proc]) -> None:
        """Take over processes another launcher started (``down`` after ``up``)."""
        with self._lock:
            self.procs.extend(procs)

    def release(self) -> None:
        """Forget the processes (they keep running): ``up`` hands them to a later ``down``."""
        with self._lock:
            self.procs, self.popens = [], {}

    def returncode(self, proc: Proc) -> Optional[int]:
        popen = self.popens.get(proc.pid)
        if popen is not None:
            return popen.poll()
        return None if proc.alive() else -1

    def record_descendants(self) -> set[int]:
        found = descendants({p.pid: p.start for p in self.procs})
        self.seen |= found | {p.pid for p in self.procs}
        return found

    def stop(self, procs: Optional[list[Proc]] = None, grace: float = 15.0) -> list[str]:
        """SIGTERM every process of ``procs`` (default: all) and all their descendants, wait up to
        ``grace`` s, SIGKILL what is left. Returns the names of the roots that needed SIGKILL."""
        with self._lock:
            targets = list(procs if procs is not None else self.procs)
        roots = {p.pid: p.start for p in targets}
        live_roots = [p for p in targets if p.alive()]
        tree = descendants(roots)
        self.seen |= tree | set(roots)
        for pid in [p.pid for p in live_roots] + sorted(tree):
            _signal_pid(pid, signal.SIGTERM)
            _signal_pid(pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._reap()
            tree |= descendants(roots)
            if not any(pid_alive(p) for p in tree) and not any(p.alive() for p in live_roots):
                break
            time.sleep(0.2)
        forced = [p.name for p in live_roots if p.alive()]
        for _ in range(3):  # SIGKILL; repeat in case something spawned meanwhile
            tree |= descendants(roots)
            left = [p.pid for p in live_roots if p.alive()] + [pid for pid in tree if pid_alive(pid)]
            if not left:
                break
            for pid in left:
                _signal_pid(pid, signal.SIGKILL)
            end = time.monotonic() + 3.0
            while time.monotonic() < end and any(pid_alive(pid) for pid in left):
                self._reap()
                time.sleep(0.1)
        self._reap()
        with self._lock:
            gone = {p.pid for p in targets}
            self.procs = [p for p in self.procs if p.pid not in gone]
            for pid in gone:
                self.popens.pop(pid, None)
        return forced

    def _reap(self) -> None:
        for popen in list(self.popens.values()):
            popen.poll()


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pid: int, sig: int, only_if_leader: bool = False) -> None:
    st = _proc_stat(pid)
    if only_if_leader and (st is None or st[2] != pid):
        return
    if pid == os.getpgid(0):  # never our own group
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_OWNED: list[Processes] = []


def _cleanup_at_exit() -> None:
    for owner in list(_OWNED):
        if owner.procs:
            owner.stop()


atexit.register(_cleanup_at_exit)


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind the launcher (so ``finally`` blocks stop processes)."""

    fired = []

    def handler(signum: int, frame: Any) -> None:
        if fired:  # already unwinding: let the clean-up finish
            print(f"deploy: {signal.Signals(signum).name}: still stopping processes...", file=sys.stderr, flush=True)
            return
        fired.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while choosing, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# --------------------------------------------------------------------------------------------
# What a SuperNode's log says when it is refused
# --------------------------------------------------------------------------------------------

_REFUSALS: list[tuple[str, str]] = [
    (r"CERTIFICATE_VERIFY_FAILED|certificate verify failed",
     "TLS: the SuperLink's certificate is not signed by the CA this SuperNode trusts (--root-certificates)"),
    (r"\[code: 2004\]",
     "authentication: the SuperLink does not know this SuperNode's public key (register it: flwr supernode register <key.pub> <connection>)"),
    (r"\[code: 2001\]",
     "authentication: the SuperLink accepts registered SuperNodes only and this one presented no key (--auth-supernode-private-key)"),
    (r"Exit Code: 303",
     "authentication needs TLS: this SuperNode has a private key but runs --insecure"),
    (r"Unable to parse the private key file",
     "authentication: the private key file is not an OpenSSH ECDSA key"),
    (r"WRONG_VERSION_NUMBER|record layer failure|wrong version number",
     "TLS mismatch: one side speaks TLS and the other does not (--insecure on one side only)"),
    (r"address already in use|Errno 98",
     "a port is already in use"),
]


def diagnose(log_text: str) -> str:
    """One line: why a SuperNode (or SuperLink) stopped, from its log."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log_text)
    hint = next((h for pattern, h in _REFUSALS if re.search(pattern, clean, re.IGNORECASE)), None)
    detail = ""
    m = re.search(r"Exit Code: (\d+)\s*\n(.*)\n(.*)", clean)
    if m:
        lines = [ln.strip() for ln in (m.group(2), m.group(3)) if ln.strip()]
        detail = f"Flower exit code {m.group(1)}: " + " ".join(lines)
    else:
        errors = [ln.strip() for ln in clean.splitlines() if re.search(r"ERROR|Error|error", ln)]
        if errors:
            detail = errors[-1]
        else:
            tail = [ln.strip() for ln in clean.splitlines() if ln.strip()]
            detail = tail[-1] if tail else "no output"
    detail = detail[:300]
    return f"{hint} [{detail}]" if hint else detail


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------------------------


def _bin(name: str) -> str:
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
    import tomli
    import tomli_w

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

    ``state-dir`` is where the client keeps its own DP-SGD ledger (one sub-folder per run); a
    restarted SuperNode with the same ``state-dir`` continues it (default ``~/.fedpriv/client-state``).
    """
    cfg = f"data-path={json.dumps(str(data_path))}" if data_path is not None else f"partition-id={index} num-partitions={num_nodes}"
    if state_dir is not None:
        cfg += f" state-dir={json.dumps(str(state_dir))}"
    return cfg


@dataclass
class Fault:
    """A fault to inject (demonstrations and tests)."""

    kind: str  # no-data | bad-data | unregistered | wrong-ca | kill | kill9
    node: int
    after_round: int = 0  # kill, kill9: once this round's line is logged (0: as soon as the run starts)
    delay: float = 0.0  # kill, kill9: seconds after that

    KINDS = ("no-data", "bad-data", "unregistered", "wrong-ca", "kill", "kill9")

    @classmethod
    def parse(cls, text: str) -> "Fault":
        m = re.fullmatch(r"([a-z0-9-]+):(\d+)(?:@(\d+)(?:\+(\d+(?:\.\d+)?))?)?", text.strip())
        if not m or m.group(1) not in cls.KINDS:
            raise DeployError(f"--fault {text!r}: expected KIND:NODE or kill[9]:NODE@ROUND[+SECONDS] with KIND one of {', '.join(cls.KINDS)}")
        kind, node = m.group(1), int(m.group(2))
        if m.group(3) is not None and kind not in ("kill", "kill9"):
            raise DeployError(f"--fault {text!r}: @ROUND only applies to kill and kill9")
        return cls(kind, node, int(m.group(3) or 0), float(m.group(4) or 0.0))


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
                [_bin("flwr"), *args], env=self.env(), cwd=self.project, capture_output=True, text=True, timeout=timeout,
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
    echo: Echo = _echo,
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
    for f in faults:
        if not 0 <= f.node < num_nodes:
            raise DeployError(f"--fault {f.kind}:{f.node}: there are nodes 0..{num_nodes - 1} only")
        if f.kind == "unregistered" and mode != "tls+auth":
            raise DeployError("--fault unregistered needs --mode tls+auth")
        if f.kind == "wrong-ca" and mode == "insecure":
            raise DeployError("--fault wrong-ca needs --mode tls or tls+auth")

    session = Path(session or DEFAULT_SESSIONS / time.strftime("%Y%m%d-%H%M%S")).resolve()
    _check_outside_fab(session)
    session.mkdir(parents=True, exist_ok=True)
    home = Path(flwr_home).resolve() if flwr_home else session / "flwr-home"
    if flwr_home is not None:
        _check_outside_fab(home)
    owner = owner or Processes()
    if owner not in _OWNED:
        _OWNED.append(owner)

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
        cmd = [_bin("flower-superlink"), *tls_args, "--disable-runtime-dependency-installation", "--host", HOST, "--port", str(port)]
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
            cmd = [_bin("flower-supernode"), *args, "--superlink", fed.address, "--port", str(node_ports[i])]
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


def _check_outside_fab(path: Path) -> None:
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
            raise DeployError(f"the SuperLink exited: {diagnose(_read(fed.superlink.log))} (log: {fed.superlink.log})")
        if _port_open(fed.port):
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
            text = _read(proc.log)
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
        echo(f"deploy: {name} did not connect within {timeout:.0f} s: {diagnose(_read(proc.log))} (log: {proc.log})")


def stop_federation(fed: Federation, owner: Processes, echo: Echo = _echo) -> None:
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


# --------------------------------------------------------------------------------------------
# Running the app
# --------------------------------------------------------------------------------------------


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
    import tomli_w

    path = scratch / "run-config.toml"
    path.write_text(tomli_w.dumps({"overrides": overrides}))
    return ["--run-config", str(path)]


def _override_keys(overrides: list[str]) -> set[str]:
    keys = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def deployment_overrides(user: list[str], num_nodes: int, run_dir: Path) -> list[str]:
    """The launcher's overrides (one client per node, the run folder) followed by the user's."""
    keys = _override_keys(user)
    mine = ["client_mode=nodes", f"num_clients={num_nodes}"]
    if "clients_per_round" not in keys:
        mine.append(f"clients_per_round={num_nodes}")
    if "run_dir" not in keys:
        mine.append(f"run_dir={run_dir}")
    out = []
    for o in user:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "run_dir" and "=" in o:
            o = f"run_dir={Path(o.split('=', 1)[1]).expanduser().resolve()}"
        out.append(o)
    return [o for o in mine if o.split("=", 1)[0] not in keys] + out


def check_overrides(overrides: list[str], num_nodes: int) -> Any:
    """Compose and preflight the configuration here, before anything starts (one-line errors)."""
    from fedpriv.compose import compose_config
    from fedpriv.config import ConfigError

    try:
        rc = compose_config(overrides)
    except ConfigError as exc:
        raise DeployError(f"configuration: {exc}") from None
    if rc.client_mode != "nodes":
        raise DeployError("client_mode must be nodes under the deployment launcher (one SuperNode = one client)")
    if rc.num_clients != num_nodes:
        raise DeployError(f"num_clients={rc.num_clients} but the federation has {num_nodes} SuperNodes: one SuperNode is one client")
    import logging

    import flwr  # noqa: F401 - sets its logger's level on import; ours must come after

    from fedpriv.launch import UserError, preflight

    logging.getLogger("flwr").setLevel(logging.ERROR)  # strategy warnings belong to the run's log
    try:
        preflight(rc)  # data present, model builds, privacy plan feasible
    except (ConfigError, UserError, ValueError) as exc:
        raise DeployError(f"configuration: {exc}") from None
    return rc


@dataclass
class RunResult:
    returncode: int
    run_id: Optional[int]
    run_dir: Optional[str]
    log: str
    summary: Optional[dict[str, Any]]
    rounds: list[dict[str, Any]]
    status: str = ""


_ROUND_LINE = re.compile(r"^round (\d+)/(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_COLOR = sys.stdout.isatty()
_NOISE = re.compile(r"httpx: HTTP Request|httpcore|^\s*$")


def run_app(
    fed: Federation,
    owner: Processes,
    user_overrides: list[str],
    faults: Iterable[Fault] = (),
    echo: Echo = _echo,
    timeout: Optional[float] = None,
) -> RunResult:
    """``flwr run <project> <connection> --stream``; streams the ServerApp's log, reports nodes
    that go away, injects ``kill`` faults, and reads back the run's summary."""
    live = len(fed.alive_nodes())
    if live == 0:
        raise DeployError("no SuperNode is connected: nothing to run")
    fed.runs += 1
    run_dir = Path(fed.session) / f"run-{fed.runs}"
    overrides = deployment_overrides(list(user_overrides), fed.num_nodes, run_dir)
    check_overrides(overrides, fed.num_nodes)
    rc_dir = None
    for o in overrides:
        if o.startswith("run_dir="):
            rc_dir = o.split("=", 1)[1]
    fed.save()
    log_path = Path(fed.session) / f"run-{fed.runs}.log"
    cmd = [_bin("flwr"), "run", fed.project, fed.connection, "--stream", *run_config_args(shlex.join(overrides), Path(fed.session))]
    echo("deploy: " + shlex.join(["flwr", *cmd[1:]]))
    if fed.refused or live < fed.num_nodes:
        echo(f"deploy: WARNING: {live} of {fed.num_nodes} SuperNodes are connected; the server waits round_timeout for the others, then counts them as dropped")

    kills = sorted((f for f in faults if f.kind in ("kill", "kill9")), key=lambda f: (f.after_round, f.delay))
    result = RunResult(returncode=-1, run_id=None, run_dir=rc_dir, log=str(log_path), summary=None, rounds=[])
    stop_watch = threading.Event()
    expected_exit: set[str] = set()
    watcher = threading.Thread(target=_watch_nodes, args=(fed, owner, stop_watch, expected_exit, echo), daemon=True)
    proc: Optional[subprocess.Popen] = None
    timed_out = threading.Event()
    timer: Optional[threading.Timer] = None
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                env=fed.env(), cwd=fed.project, start_new_session=True, bufsize=1,
            )
            watcher.start()
            if timeout is not None:  # a stuck run ends here, not at Flower's own timeouts
                timer = threading.Timer(timeout, lambda: (timed_out.set(), _signal_group(proc.pid, signal.SIGTERM)))
                timer.daemon = True
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                m = re.search(r"Successfully started run (\d+)", text)
                if m:
                    result.run_id = int(m.group(1))
                m = re.search(r"fedpriv: writing the run to (.+)$", text)
                if m:
                    result.run_dir = m.group(1).strip()
                plain = _ANSI.sub("", text)
                if not _NOISE.search(plain):
                    echo(text if _COLOR else plain)
                m = _ROUND_LINE.search(plain)
                done = int(m.group(1)) if m else (0 if result.run_id is not None else -1)
                while kills and kills[0].after_round <= done:
                    f = kills.pop(0)
                    _schedule_kill(fed, f, expected_exit, echo)
            result.returncode = proc.wait()
            if timed_out.is_set():
                raise DeployError(f"the run took longer than {timeout:.0f} s (log: {log_path})")
    except BaseException:
        if result.run_id is not None:
            echo(f"deploy: stopping run {result.run_id} on the SuperLink")
            try:
                fed.flwr("stop", str(result.run_id), fed.connection, timeout=20)
            except Exception:  # noqa: BLE001 - best effort while unwinding
                pass
        raise
    finally:
        stop_watch.set()
        if timer is not None:
            timer.cancel()
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()

    if result.run_id is not None:
        result.status = _run_status(fed, result.run_id)
    if result.run_dir:
        rd = Path(result.run_dir)
        if (rd / "summary.json").exists():
            result.summary = json.loads((rd / "summary.json").read_text())
        result.rounds = operator_view(rd)
    return result


def operator_view(run_dir: Path) -> list[dict[str, Any]]:
    """Each round's published figures with its operator-only diagnostics (this launcher is the
    operator's tool: counts of replies and failures, round times)."""
    from fedpriv import run_folder

    raw = {int(r["round"]): r for r in run_folder.read_jsonl(run_dir / run_folder.DIAGNOSTICS)}
    return [{**r, **raw.get(int(r["round"]), {})} for r in run_folder.read_metrics(run_dir)]


def _schedule_kill(fed: Federation, fault: Fault, expected: set[str], echo: Echo) -> None:
    proc = fed.nodes[fault.node]
    sig = signal.SIGKILL if fault.kind == "kill9" else signal.SIGTERM

    def kill() -> None:
        if not proc.alive():
            return
        expected.add(proc.name)
        echo(f"deploy: fault: {signal.Signals(sig).name} to {proc.name} (pid {proc.pid} and its process group)")
        _signal_group(proc.pid, sig)

    if fault.delay > 0:
        timer = threading.Timer(fault.delay, kill)
        timer.daemon = True
        timer.start()
    else:
        kill()


def _watch_nodes(fed: Federation, owner: Processes, stop: threading.Event, expected: set[str], echo: Echo) -> None:
    reported: set[str] = {p.name for p in fed.nodes if not p.alive()}
    while not stop.wait(1.0):
        owner.record_descendants()
        for proc in fed.nodes:
            if proc.name not in reported and owner.returncode(proc) is not None:
                reported.add(proc.name)
                why = "killed by the fault injector" if proc.name in expected else diagnose(_read(proc.log))
                echo(f"deploy: {proc.name} (pid {proc.pid}) left the federation: {why}; the run goes on with the others")


def _run_status(fed: Federation, run_id: int) -> str:
    try:
        res = fed.flwr("ls", fed.connection, "--run-id", str(run_id), "--format", "json", timeout=30)
        data = json.loads(res.stdout[res.stdout.find("{") :])
        runs = data.get("runs") or []
        return str(runs[0].get("status", "")) if runs else ""
    except Exception:  # noqa: BLE001 - informative only
        return ""


def report(result: RunResult, echo: Echo = _echo) -> bool:
    """Final lines: accuracy, epsilon, per-round times. True if the run completed."""
    s = result.summary
    trained_none = False
    if s is None:
        echo(f"deploy: the run wrote no summary.json (flwr run exit code {result.returncode}, status {result.status or '?'}); see {result.log}")
        return False
    if result.rounds:
        times = ", ".join(f"{r['round']}: {r['round_seconds']:.1f} s" for r in result.rounds)
        echo(f"deploy: round times: {times}")
        failed = sum(int(r.get("num_failed", 0)) for r in result.rounds)
        dropped = sum(int(r.get("num_dropped", 0)) for r in result.rounds)
        if failed or dropped:
            echo(f"deploy: client replies over the run: {failed} failed, {dropped} never came")
        if not any(int(r.get("num_clients", 0)) for r in result.rounds):
            echo("deploy: WARNING: no client update was aggregated in any round (see the failures above)")
            trained_none = True
    echo(
        f"deploy: final test accuracy {s.get('final_accuracy', float('nan')):.4f} after "
        f"{s.get('rounds_completed')}/{s.get('rounds_planned')} rounds ({s.get('stop_reason')}), run {result.run_id} {result.status}"
    )
    if "epsilon" in s:
        echo(f"deploy: central DP (user-level): epsilon {s['epsilon']:.3f} at delta {s.get('delta', float('nan')):.2e}")
    if "local_epsilon_max" in s:
        echo(f"deploy: local DP-SGD (example-level): max client epsilon {s['local_epsilon_max']:.3f} at delta {s.get('local_delta', float('nan')):.1e}")
    if "epsilon" not in s and "local_epsilon_max" not in s:
        echo(f"deploy: epsilon: none (privacy={s.get('privacy', 'none')}: no differential privacy)")
    echo(f"deploy: outputs in {result.run_dir}")
    return s.get("stop_reason") == "completed" and s.get("rounds_completed") == s.get("rounds_planned") and not trained_none


# --------------------------------------------------------------------------------------------
# Helpers for owners' data files and for a real deployment's certificates
# --------------------------------------------------------------------------------------------


def export_data(num_nodes: int, out: Path, overrides: list[str], echo: Echo = _echo) -> list[Path]:
    """Write each node's partition as ``node-<i>.npz`` (x_train, y_train, x_val, y_val): stand-ins
    for data owners' own files, to try ``data-path=``."""
    import numpy as np

    from fedpriv.compose import compose_config
    from fedpriv.task import load_client_data

    from fedpriv.config import ConfigError

    try:
        rc = compose_config(deployment_overrides(list(overrides), num_nodes, out / "unused"))
    except ConfigError as exc:
        raise DeployError(f"configuration: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_nodes):
        d = load_client_data(rc, i, {"partition-id": i, "num-partitions": num_nodes})
        path = out / f"node-{i}.npz"
        np.savez(path, x_train=d.x_train, y_train=d.y_train, x_val=d.x_val, y_val=d.y_val)
        echo(f"deploy: wrote {path} ({len(d.x_train)} training rows, {len(d.x_val)} validation rows)")
        paths.append(path)
    return paths


def make_deployment_certs(out: Path, hosts: list[str], keys: int, echo: Echo = _echo) -> None:
    """CA + SuperLink certificate for ``hosts``, and ``keys`` SuperNode key pairs, for real machines."""
    ca, ca_key = make_ca(out, days=365)
    cert, key = make_server_cert(out, ca, ca_key, hosts, days=365)
    echo(f"deploy: CA {ca} (keep {ca_key} offline), SuperLink certificate {cert} + {key} for {', '.join(hosts)}")
    for i in range(keys):
        priv, pub = make_node_key(out / "supernodes", f"supernode-{i}")
        echo(f"deploy: SuperNode key {priv} (give to owner {i}), public key {pub} (register on the SuperLink)")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

CURRENT = "current.json"


def _current_session(base: Path) -> Optional[Path]:
    p = base / CURRENT
    if not p.exists():
        return None
    try:
        return Path(json.loads(p.read_text())["session"])
    except (ValueError, KeyError):
        return None


def _live_federation(base: Path, session: Optional[Path]) -> Optional[Federation]:
    s = session or _current_session(base)
    if s is None or not (s / "state.json").exists():
        return None
    fed = Federation.load(s)
    if fed.superlink is not None and fed.superlink.alive():
        return fed
    return None


def _add_federation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=None, help="number of SuperNodes = clients (default 3, or one per --data-path)")
    p.add_argument("--mode", choices=MODES, default=None, help="transport security (default tls+auth)")
    p.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME of the SuperLink and CLI (default: <session>/flwr-home)")
    p.add_argument("--data-path", action="append", default=None, help="an owner's .npz for node i (repeat, one per node)")
    p.add_argument("--fault", action="append", default=[], help="inject a fault: no-data:I, bad-data:I, unregistered:I, wrong-ca:I, kill:I@ROUND[+S], kill9:I@ROUND[+S]")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the SuperLink and SuperNodes to come up")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/deploy.py",
        description="fedpriv on a local Flower deployment: a SuperLink and N SuperNodes on 127.0.0.1.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sessions", type=Path, default=DEFAULT_SESSIONS, help=f"where session folders go (default {DEFAULT_SESSIONS})")
    common.add_argument("--session", type=Path, default=None, help="a session folder (default: a new one for up/run, the current one otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start a SuperLink and N SuperNodes and leave them running")
    _add_federation_args(up)
    run = sub.add_parser("run", parents=[common], help="run the app (on the running federation, else up + run + down); Hydra overrides after --")
    _add_federation_args(run)
    run.add_argument("--keep", action="store_true", help="one-shot mode: leave the federation running afterwards")
    run.add_argument("--run-timeout", type=float, default=None, help="stop the run (flwr stop) after this many seconds")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. privacy=central num_rounds=5")
    sub.add_parser("status", parents=[common], help="processes, connected SuperNodes and runs of the current federation")
    sub.add_parser("down", parents=[common], help="stop every process of the current federation")
    certs = sub.add_parser("certs", help="CA, SuperLink certificate and SuperNode keys for a real deployment")
    certs.add_argument("--out", type=Path, required=True)
    certs.add_argument("--host", action="append", required=True, help="the SuperLink's DNS name or IP as SuperNodes dial it (repeat)")
    certs.add_argument("--supernode-keys", type=int, default=0)
    exp = sub.add_parser("export-data", help="write each node's partition as node-<i>.npz (to try data-path=)")
    exp.add_argument("--nodes", type=int, required=True)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("overrides", nargs="*")
    return parser


def _num_nodes(args: argparse.Namespace) -> int:
    if args.data_path and args.nodes is not None and args.nodes != len(args.data_path):
        raise DeployError(f"--nodes {args.nodes} but {len(args.data_path)} --data-path: give one data path per node")
    return len(args.data_path) if args.data_path else (args.nodes or 3)


def _set_current(base: Path, fed: Federation) -> None:
    base.mkdir(parents=True, exist_ok=True)
    (base / CURRENT).write_text(json.dumps({"session": fed.session}) + "\n")


def _clear_current(base: Path, fed: Federation) -> None:
    cur = _current_session(base)
    if cur is not None and str(cur) == fed.session:
        (base / CURRENT).unlink(missing_ok=True)


def _up(args: argparse.Namespace, owner: Processes) -> Federation:
    faults = [Fault.parse(f) for f in args.fault]
    fed, _ = start_federation(
        _num_nodes(args), args.mode or "tls+auth", args.session, args.flwr_home, args.data_path, faults, owner, args.timeout,
    )
    if len(fed.refused) == fed.num_nodes:
        stop_federation(fed, owner)
        raise DeployError("every SuperNode was refused: nothing to run")
    return fed


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    install_signal_handlers()
    base: Path = Path(getattr(args, "sessions", DEFAULT_SESSIONS)).resolve()
    if getattr(args, "session", None) is not None:
        args.session = args.session.resolve()
    owner = Processes()
    _OWNED.append(owner)
    try:
        if args.command == "up":
            if _live_federation(base, None):
                raise DeployError(f"a federation is already up (session {_current_session(base)}): `scripts/deploy.py down` first")
            fed = _up(args, owner)
            _set_current(base, fed)
            owner.release()
            _print_connection(fed)
            return 0
        if args.command == "run":
            faults = [Fault.parse(f) for f in args.fault]
            fed = _live_federation(base, args.session)
            if fed is not None:  # attach to the running federation
                if args.nodes is not None and args.nodes != fed.num_nodes:
                    raise DeployError(f"the running federation has {fed.num_nodes} SuperNodes, not {args.nodes}: `down` first or drop --nodes")
                if args.mode is not None and args.mode != fed.mode:
                    raise DeployError(f"the running federation uses --mode {fed.mode}, not {args.mode}: `down` first or drop --mode")
                if args.data_path:
                    raise DeployError("--data-path applies when SuperNodes start: `down` first")
                if any(f.kind not in ("kill", "kill9") for f in faults):
                    raise DeployError("start-up faults (no-data, bad-data, unregistered, wrong-ca) need a new federation: `down` first")
                echo_session = f"deploy: using the running federation in {fed.session}"
                _echo(echo_session)
                result = run_app(fed, owner, args.overrides, faults, timeout=args.run_timeout)
                return 0 if report(result) else 1
            if args.session is not None and (args.session / "state.json").exists():
                raise DeployError(f"the federation in {args.session} is not running")
            # one-shot: up + run + down; the configuration is checked before anything starts
            n = _num_nodes(args)
            check_overrides(deployment_overrides(list(args.overrides), n, base / "run"), n)
            fed = _up(args, owner)
            keep = args.keep
            try:
                if fed.refused:
                    keep = False
                    raise DeployError(
                        f"{len(fed.refused)} of {fed.num_nodes} SuperNodes refused ({', '.join(fed.refused)}): not starting the run"
                    )
                result = run_app(fed, owner, args.overrides, faults, timeout=args.run_timeout)
                ok = report(result)
            finally:
                if keep:
                    _set_current(base, fed)
                    owner.release()
                    _print_connection(fed)
                else:
                    stop_federation(fed, owner)
            return 0 if ok else 1
        if args.command == "status":
            return _status(base, args.session)
        if args.command == "down":
            s = args.session or _current_session(base)
            if s is None or not (Path(s) / "state.json").exists():
                _echo("deploy: no federation to stop")
                return 0
            fed = Federation.load(Path(s))
            owner.adopt(fed.procs)
            stop_federation(fed, owner)
            _clear_current(base, fed)
            return 0
        if args.command == "certs":
            make_deployment_certs(args.out.resolve(), args.host, args.supernode_keys)
            return 0
        if args.command == "export-data":
            export_data(args.nodes, args.out.resolve(), args.overrides)
            return 0
    except DeployError as exc:
        print(f"deploy: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as exc:
        print(f"deploy: interrupted ({exc}); stopping what this command started", file=sys.stderr, flush=True)
        owner.stop()
        return 130
    finally:
        if owner.procs:
            owner.stop()
    return 0


def _print_connection(fed: Federation) -> None:
    _echo(f"deploy: federation up; connection `{fed.connection}` in {fed.flwr_home}/config.toml. Try:")
    _echo(f"  FLWR_HOME={fed.flwr_home} flwr supernode list {fed.connection}")
    _echo(f"  FLWR_HOME={fed.flwr_home} flwr ls {fed.connection}")
    _echo("  scripts/deploy.py run -- num_rounds=3      scripts/deploy.py status      scripts/deploy.py down")


def _status(base: Path, session: Optional[Path]) -> int:
    s = session or _current_session(base)
    if s is None or not (Path(s) / "state.json").exists():
        _echo("deploy: no federation (run `scripts/deploy.py up`)")
        return 1
    fed = Federation.load(Path(s))
    _echo(f"deploy: session {fed.session}: mode {fed.mode}, SuperLink {fed.address}, FLWR_HOME {fed.flwr_home}")
    for p in fed.procs:
        extra = ""
        if p in fed.nodes:
            i = fed.nodes.index(p)
            extra = f"  node-config: {fed.node_configs[i] or '(none)'}"
        _echo(f"  {p.name:10s} pid {p.pid:7d}  {'running' if p.alive() else 'stopped'}{extra}")
    if fed.superlink is None or not fed.superlink.alive():
        return 1
    for args in (("supernode", "list", fed.connection), ("ls", fed.connection)):
        res = fed.flwr(*args)
        _echo((res.stdout + res.stderr).rstrip())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
