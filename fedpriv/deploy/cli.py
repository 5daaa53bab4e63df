"""The command line (``scripts/deploy.py``, examples in :mod:`fedpriv.deploy`): up, run, status, down, certs, export-data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from fedpriv.deploy.certs import make_deployment_certs
from fedpriv.deploy.common import DEFAULT_SESSIONS, MODES, DeployError, print_line
from fedpriv.deploy.faults import Fault
from fedpriv.deploy.federation import Federation, start_federation, stop_federation
from fedpriv.deploy.overrides import check_overrides, deployment_overrides
from fedpriv.deploy.owner_data import export_data
from fedpriv.deploy.processes import Interrupted, Processes, install_signal_handlers
from fedpriv.deploy.runner import report, run_app

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
    owner = Processes()  # stopped at exit once it starts or adopts a process
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
                print_line(f"deploy: using the running federation in {fed.session}")
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
                print_line("deploy: no federation to stop")
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
    print_line(f"deploy: federation up; connection `{fed.connection}` in {fed.flwr_home}/config.toml. Try:")
    print_line(f"  FLWR_HOME={fed.flwr_home} flwr supernode list {fed.connection}")
    print_line(f"  FLWR_HOME={fed.flwr_home} flwr ls {fed.connection}")
    print_line("  scripts/deploy.py run -- num_rounds=3      scripts/deploy.py status      scripts/deploy.py down")


def _status(base: Path, session: Optional[Path]) -> int:
    s = session or _current_session(base)
    if s is None or not (Path(s) / "state.json").exists():
        print_line("deploy: no federation (run `scripts/deploy.py up`)")
        return 1
    fed = Federation.load(Path(s))
    print_line(f"deploy: session {fed.session}: mode {fed.mode}, SuperLink {fed.address}, FLWR_HOME {fed.flwr_home}")
    for p in fed.procs:
        extra = ""
        if p in fed.nodes:
            i = fed.nodes.index(p)
            extra = f"  node-config: {fed.node_configs[i] or '(none)'}"
        print_line(f"  {p.name:10s} pid {p.pid:7d}  {'running' if p.alive() else 'stopped'}{extra}")
    if fed.superlink is None or not fed.superlink.alive():
        return 1
    for args in (("supernode", "list", fed.connection), ("ls", fed.connection)):
        res = fed.flwr(*args)
        print_line((res.stdout + res.stderr).rstrip())
    return 0
