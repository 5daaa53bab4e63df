"""The deployment launcher: a real SuperLink and SuperNodes on 127.0.0.1 (slow), and its parts (fast)."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fedpriv import deploy

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ fast: the launcher's parts


def test_run_config_quoting_round_trips_through_flwr(tmp_path):
    from flwr.common.config import parse_config_args

    for overrides in (
        ["client_mode=nodes", "num_clients=3", "privacy=central", "run_dir=/tmp/a b/run-1"],
        ["tracking.tags=[a,b]", 'tracking.name="x y"'],
        ["tracking.name='it''s'", 'tracking.group="g"'],
    ):
        text = shlex.join(overrides)
        args = deploy.run_config_args(text, tmp_path)
        assert args[0] == "--run-config"
        parsed = parse_config_args([args[1]])
        assert parsed == {"overrides": text}
        assert shlex.split(parsed["overrides"]) == overrides


def test_node_config_is_valid_flower_node_config():
    from flwr.common.config import parse_config_args

    assert parse_config_args([deploy.node_config_string(1, 3)]) == {"partition-id": 1, "num-partitions": 3}
    assert parse_config_args([deploy.node_config_string(0, 3, "/data/owner a.npz")]) == {"data-path": "/data/owner a.npz"}
    assert parse_config_args([deploy.node_config_string(0, 3, None, "/s/node 0")]) == {
        "partition-id": 0, "num-partitions": 3, "state-dir": "/s/node 0"}


def test_deployment_overrides_put_the_users_last_and_make_run_dir_absolute(tmp_path):
    out = deploy.deployment_overrides(["num_rounds=2", "run_dir=rel/run"], 3, tmp_path / "run-1")
    assert out[:3] == ["client_mode=nodes", "num_clients=3", "clients_per_round=3"]
    assert out[-1] == f"run_dir={Path('rel/run').resolve()}"
    out = deploy.deployment_overrides(["clients_per_round=2"], 3, tmp_path / "run-1")
    assert out == ["client_mode=nodes", "num_clients=3", f"run_dir={tmp_path / 'run-1'}", "clients_per_round=2"]


def test_certificates_and_keys(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    ca, ca_key = deploy.make_ca(tmp_path)
    cert, key = deploy.make_server_cert(tmp_path, ca, ca_key, ["127.0.0.1", "superlink.example.org"])
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    c.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "superlink.example.org" in san.get_values_for_type(x509.DNSName)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    priv, pub = deploy.make_node_key(tmp_path, "node-0")
    k = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == k.public_key().public_numbers()


def test_refusals_read_from_supernode_logs():
    wrong_ca = (
        "\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
        "Failed to initialize the connection to the SuperLink.\n"
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)\n"
    )
    unregistered = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode.\n"
    assert deploy.diagnose(wrong_ca).startswith("TLS: the SuperLink's certificate is not signed by the CA")
    assert "does not know this SuperNode's public key" in deploy.diagnose(unregistered)
    assert "\n" not in deploy.diagnose(wrong_ca)


def test_fault_syntax():
    assert deploy.Fault.parse("kill9:2@1+7.5") == deploy.Fault("kill9", 2, 1, 7.5)
    assert deploy.Fault.parse("no-data:0") == deploy.Fault("no-data", 0)
    for bad in ("explode:1", "no-data:1@2", "kill:x"):
        with pytest.raises(deploy.DeployError):
            deploy.Fault.parse(bad)


def test_session_folder_inside_the_project_must_be_ignored(tmp_path):
    with pytest.raises(deploy.DeployError, match="app bundle"):
        deploy.check_outside_fab(ROOT / "deploy-logs" / "x")
    deploy.check_outside_fab(ROOT / "outputs" / "deploy" / "x")
    deploy.check_outside_fab(tmp_path)


def test_the_app_bundle_carries_conf_and_the_three_packages():
    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    for needed in ("conf/config.yaml", "fedpriv/server_app.py", "fedpriv/client_app.py", "strategies/__init__.py", "clients/__init__.py"):
        assert needed in names
    assert not any(n.startswith("outputs/") for n in names)


def test_process_tree_is_stopped_even_after_its_root_exited(tmp_path):
    """A root that exits leaves a child in its process group: stop() still finds and ends it."""
    owner = deploy.Processes()
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(0.5)"
    proc = owner.start("parent", [sys.executable, "-c", script], tmp_path / "p.log", dict(os.environ), tmp_path)
    deadline = time.monotonic() + 20
    while owner.returncode(proc) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert owner.returncode(proc) == 0  # the root is gone, its child lives on in its process group
    child = deploy.descendants({proc.pid: proc.start})
    assert len(child) == 1
    owner.stop(grace=3)
    assert not any(deploy.pid_alive(p) for p in child | {proc.pid})


def test_exit_hook_comes_with_the_first_process_and_stops_it(tmp_path):
    """Importing the launcher registers nothing; a process an owner started is stopped at exit."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from fedpriv import deploy\n"
        "from fedpriv.deploy import processes\n"
        "assert processes._OWNED == [], processes._OWNED\n"
        "owner = deploy.Processes()\n"
        "d = Path(sys.argv[1])\n"
        "p = owner.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'], d / 's.log', dict(os.environ), d)\n"
        "assert processes._OWNED == [owner]\n"
        "print(p.pid, p.start, flush=True)\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pid, start = (int(x) for x in res.stdout.split())
    assert not deploy.pid_alive(pid, start)


# ------------------------------------------------------------------ slow: a real federation


@pytest.fixture
def federation(tmp_path, request):
    """A SuperLink and two SuperNodes over TLS on free ports, with a temporary FLWR_HOME.

    The finalizer stops every process (by PID, with their descendants) and fails the test if
    any PID this fixture ever saw is still alive, whether the test passed or not.
    """
    owner = deploy.Processes()
    held: dict[str, deploy.Federation] = {}

    def finalize() -> None:
        fed = held.get("fed")
        owner.record_descendants()
        owner.stop(grace=10)
        pids = set(owner.seen) | ({p.pid for p in fed.procs} if fed else set())
        left = sorted(p for p in pids if deploy.pid_alive(p))
        assert not left, f"processes left behind: {left}"

    request.addfinalizer(finalize)
    fed, _ = deploy.start_federation(
        getattr(request, "param", 2), "tls", session=tmp_path / "session", flwr_home=tmp_path / "flwr-home", owner=owner, timeout=90, echo=print,
    )
    held["fed"] = fed
    return fed, owner


@pytest.mark.slow
def test_private_run_over_tls_on_two_supernodes(federation, tmp_path):
    fed, owner = federation
    assert fed.refused == [] and len(fed.alive_nodes()) == 2
    assert Path(fed.flwr_home, "config.toml").read_text().count("root-certificates") == 1
    private = (ROOT / "conf" / "privacy" / "central.yaml").exists()
    overrides = ["num_rounds=2", "round_timeout=60"]
    if private:
        overrides += ["privacy=central", "privacy.noise_multiplier=1.0"]

    result = deploy.run_app(fed, owner, overrides, echo=print, timeout=150)
    owner.record_descendants()

    assert result.run_id is not None
    assert result.status == "finished:completed", result.status
    run_dir = Path(result.run_dir)
    assert run_dir == Path(fed.session) / "run-1"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = deploy.operator_view(run_dir)  # published figures and the operator's counts
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed"
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["num_clients"] == 2 and r["num_failed"] == 0 for r in rows)
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    if private:
        assert (run_dir / "privacy.json").exists()
        assert summary["privacy"] == "central" and summary["epsilon"] > 0
    assert deploy.report(result, echo=print)

    seen = {p.pid for p in fed.procs} | owner.seen
    deploy.stop_federation(fed, owner, echo=print)
    assert not [p for p in seen if deploy.pid_alive(p)]


@pytest.mark.slow
@pytest.mark.parametrize("federation", [3], indirect=True)
def test_distributed_dp_with_secure_aggregation_on_three_supernodes(federation, tmp_path):
    """privacy=distributed over real SuperNodes: the four SecAgg+ stages are four messages to each node,
    whose ClientApp keeps its round's secrets in the node's own client-state folder between them and
    deletes them after unmasking; the server decodes only the sum of three noised vectors."""
    fed, owner = federation
    assert fed.refused == [] and len(fed.alive_nodes()) == 3
    result = deploy.run_app(fed, owner, ["num_rounds=1", "round_timeout=120", "privacy=distributed"],
                            echo=print, timeout=300)
    owner.record_descendants()
    assert result.status == "finished:completed", result.status
    run_dir = Path(result.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["privacy"] == "distributed"
    assert 0 < summary["epsilon"] <= summary["epsilon_against_server"]
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["threat_model"]["server"].startswith("honest but curious")
    rows = deploy.operator_view(run_dir)
    assert [(r["secagg_survivors"], r["secagg_released"]) for r in rows] == [(3, 1.0)]
    stores = sorted(Path(fed.session, "nodes").glob("node-*/client-state"))
    assert len(stores) == 3 and all(stores)
    assert not [f for s in stores for f in s.rglob("secagg-*")], "a node kept its round's secrets"
    deploy.stop_federation(fed, owner, echo=print)
