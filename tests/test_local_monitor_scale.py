"""The server's local-DP monitor at scale: O(round) work, exact running figures, the journal.

Figures are checked against computations made here, independently of the monitor's code: Python's
``max`` and ``math.fsum`` over the whole table, and dp-accounting's RDP accountant called directly
for a client whose ledger was lost. The journal is checked by rebuilding the table from the files
after an interruption at every point of a round (a crash after the journal line, a torn line, a
process killed with SIGKILL) and comparing it with a monitor that ran the same rounds unbroken.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from conftest import InProcessGrid
from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.errors import RunFolderError
from fedpriv.federation import run_federation
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor
from fedpriv.privacy.running import RunningFigures

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
Z, Q, STEPS = 1.0, 0.125, 8  # every trained round: 8 DP-SGD steps at z = 1, q = 1/8


def rc():
    return compose_config(["privacy=local", "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0",
                           "privacy.accountant=rdp", "privacy.secure_rng=false", "tracking.progress=false"])


@functools.cache
def independent_rdp(steps: int) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(Z)), steps)
    return acc.get_epsilon(DELTA)


class _Reply:
    def __init__(self, metrics: dict, key: str | None):
        self.content = {"metrics": metrics, **({"client": {"key": key}} if key is not None else {})}


class Fleet:
    """Deterministic rounds of replies; keeps what an independent reference needs per client."""

    def __init__(self, clients: int, per_round: int, seed: int = 0):
        self.rng, self.clients, self.per_round = random.Random(seed), clients, per_round
        self.trained: dict[str, int] = defaultdict(int)
        self.reported: dict[str, tuple[float, int]] = {}  # latest (epsilon, ledger rounds)

    def round(self) -> list[_Reply]:
        replies = []
        for c in self.rng.sample(range(self.clients), self.per_round):
            cid, declined = f"client-{c}", self.rng.random() < 0.1
            self.trained[cid] += 0 if declined else 1
            rounds = 1 if c % 7 == 0 else self.trained[cid]  # every 7th client's ledger forgets its past
            eps = round(self.rng.uniform(0.1, 3.0), 3)  # the client's own figure (may go down)
            self.reported[cid] = (eps, rounds)
            replies.append(_Reply({"num-examples": 512.0, "local_epsilon": eps, "local_rounds": float(rounds),
                                   "local_steps": 0.0 if declined else float(STEPS), "local_noise_multiplier": Z,
                                   "local_sample_rate": Q, "declined": float(declined)}, cid))
        if self.rng.random() < 0.2:
            replies.append(_Reply({"num-examples": 10.0}, None))  # no report: counted as unattributed
        return replies

    def figures(self) -> dict[str, float]:
        """Each client's figure, computed here: its own unless its ledger lacks rounds the server saw."""
        out = {}
        for cid, (eps, rounds) in self.reported.items():
            seen = self.trained[cid]
            out[cid] = eps if rounds >= seen else max(eps, independent_rdp(seen * STEPS))
        return out


# ------------------------------------------------------------------ exact running figures


def test_running_figures_equal_max_and_fsum_under_any_updates():
    rng = random.Random(1)
    running, values = RunningFigures(), {}
    for _ in range(3000):
        key = f"c{rng.randrange(200)}"
        value = rng.choice([rng.uniform(0, 10), rng.uniform(0, 1e-3), rng.uniform(1e3, 1e6), values.get(key, 0.0)])
        running.set(key, value)
        values[key] = value
        assert running.max() == max(values.values())
        assert running.mean() == math.fsum(values.values()) / len(values)
    assert len(running._heap) <= 2 * len(values) + 65  # stale entries are dropped


def test_the_running_mean_is_exact_where_a_float_running_sum_drifts():
    running = RunningFigures()
    running.set("a", 1e17)
    running.set("b", 1.0)
    running.set("a", 0.0)  # a float sum: 1e17 + 1 - 1e17 = 0
    assert running.mean() == 0.5 and running.max() == 1.0


def test_running_figures_with_infinite_or_nan_figures():
    running = RunningFigures()
    assert running.max() == 0.0 and running.mean() == 0.0  # nobody heard from yet
    running.set("a", 2.0)
    running.set("b", math.inf)
    assert running.max() == math.inf and running.mean() == math.inf
    running.set("c", math.nan)
    assert math.isnan(running.max()) and math.isnan(running.mean())
    running.set("b", 1.0)
    running.set("c", 4.0)
    assert running.max() == 4.0 and running.mean() == 7.0 / 3


# ------------------------------------------------------------------ the monitor's figures and cost


def test_round_figures_match_an_independent_computation_over_the_whole_table():
    mon, fleet = LocalPrivacyMonitor(rc()), Fleet(60, 12)
    for rnd in range(1, 16):
        record: dict = {}
        mon.observe_round(rnd, fleet.round(), record)
        expected = fleet.figures()
        assert record["local_epsilon_max"] == pytest.approx(max(expected.values()), rel=1e-9)
        assert record["local_epsilon_mean"] == pytest.approx(math.fsum(expected.values()) / len(expected), rel=1e-9)
    section = mon.section()
    assert {r["client_id"]: r["epsilon"] for r in section["clients"]} == pytest.approx(expected, rel=1e-9)
    assert section["epsilon_max"] == record["local_epsilon_max"]  # the summary is the last round's figure, exactly
    assert section["epsilon_mean"] == record["local_epsilon_mean"]
    assert any("its state was lost" in c for c in section["caveats"])


def test_a_round_recomputes_only_the_clients_heard_from_in_it(monkeypatch):
    """With many clients whose ledgers are incomplete, a round re-accounts its own clients only
    (the old monitor re-accounted every incomplete client every round), and the checkpoint's
    share of the monitor does not grow with the clients seen."""
    mon, fleet = LocalPrivacyMonitor(rc()), Fleet(700, 100)
    for rnd in range(1, 8):
        mon.observe_round(rnd, fleet.round(), {})
    incomplete = sum(1 for e in mon.clients.values() if not e.ledger_complete)
    assert incomplete > 20
    calls = []
    original = LocalPrivacyMonitor._recomputed
    monkeypatch.setattr(LocalPrivacyMonitor, "_recomputed", lambda self, e: calls.append(e.client_id) or original(self, e))
    replies = fleet.round()
    mon.observe_round(8, replies, {})
    heard = {r.content["client"]["key"] for r in replies if "client" in r.content}
    assert calls and set(calls) <= heard and len(calls) <= len(heard)


# ------------------------------------------------------------------ the journal


def run_rounds(mon: LocalPrivacyMonitor, fleet: Fleet, first: int, last: int) -> list[dict]:
    records = []
    for rnd in range(first, last + 1):
        record: dict = {}
        mon.observe_round(rnd, fleet.round(), record)
        records.append(record)
    return records


def advanced(fleet: Fleet, rounds: int) -> Fleet:
    for _ in range(rounds):
        fleet.round()
    return fleet


def attached(run_dir: Path, resumed: bool = False) -> LocalPrivacyMonitor:
    mon = LocalPrivacyMonitor(rc())
    mon.attach(run_dir, resumed=resumed)
    return mon


def table(mon: LocalPrivacyMonitor) -> list[dict]:
    """Every field of every entry, in the table's order, and each client's cached figure."""
    return [{**asdict(e), "figure": mon.figures.values[cid]} for cid, e in mon.clients.items()]


def resumed_from(run_dir: Path, ref: dict) -> LocalPrivacyMonitor:
    mon = attached(run_dir, resumed=True)
    mon.load_state_dict(json.loads(json.dumps(ref)))  # as a checkpoint would hold it
    return mon


def test_the_checkpoint_holds_a_reference_and_resume_rebuilds_the_same_table(tmp_path):
    mon, fleet = attached(tmp_path), Fleet(80, 15)
    run_rounds(mon, fleet, 1, 6)
    ref = mon.state_dict()
    assert set(ref) == {"journal", "round", "lines", "clients_seen", "unattributed"}
    assert ref["round"] == 6 and ref["lines"] == 6 and ref["journal"] == run_folder.LOCAL_MONITOR_JOURNAL
    assert len(run_folder.read_jsonl(tmp_path / run_folder.LOCAL_MONITOR_JOURNAL)) == 6
    again = resumed_from(tmp_path, ref)
    assert table(again) == table(mon) and again.section() == mon.section() and again.unattributed == mon.unattributed
    assert again.epsilons() == mon.epsilons() and again.state_dict() == ref
    # Both go on alike: the same next rounds give the same figures.
    assert run_rounds(mon, fleet, 7, 8) == run_rounds(again, advanced(Fleet(80, 15), 6), 7, 8)
    assert again.section() == mon.section()


def test_a_crash_after_the_journal_line_and_before_the_checkpoint_replays_to_the_checkpoint(tmp_path):
    mon, fleet = attached(tmp_path), Fleet(50, 10)
    run_rounds(mon, fleet, 1, 4)
    ref, table = mon.state_dict(), mon.section()
    run_rounds(mon, fleet, 5, 5)  # round 5 in the journal; the run dies before its checkpoint
    path = tmp_path / run_folder.LOCAL_MONITOR_JOURNAL
    with path.open("a") as f:
        f.write('{"round": 6, "unattributed": 0, "obs": [["client-1", 51')  # and a torn line after it
    again = resumed_from(tmp_path, ref)
    assert again.section() == table
    assert [r["round"] for r in run_folder.read_jsonl(path)] == [1, 2, 3, 4]  # later lines dropped for good
    # The resumed run trains round 5 again (fresh replies) and goes on like an unbroken run would.
    reference = LocalPrivacyMonitor(rc())
    run_rounds(reference, Fleet(50, 10), 1, 4)
    fleet_a, fleet_b = advanced(Fleet(50, 10), 4), advanced(Fleet(50, 10), 4)
    assert run_rounds(again, fleet_a, 5, 6) == run_rounds(reference, fleet_b, 5, 6)
    assert again.section() == reference.section() and again.state_dict()["lines"] == 6


def test_a_missing_or_short_journal_refuses_the_resume(tmp_path):
    mon = attached(tmp_path)
    run_rounds(mon, Fleet(20, 5), 1, 3)
    ref = mon.state_dict()
    path = tmp_path / run_folder.LOCAL_MONITOR_JOURNAL
    run_folder.keep_rounds_up_to(path, 2)
    with pytest.raises(RunFolderError, match="holds 2 lines up to round 3, the checkpoint expects 3"):
        resumed_from(tmp_path, ref)
    path.unlink()
    with pytest.raises(RunFolderError, match="local_monitor.jsonl is missing"):
        resumed_from(tmp_path, ref)
    with pytest.raises(RunFolderError, match="attach the run folder"):
        LocalPrivacyMonitor(rc()).load_state_dict(ref)


def test_a_checkpoint_that_holds_the_whole_table_starts_the_journal(tmp_path):
    """A run checkpointed by the previous monitor (the table in checkpoint.pt) resumes too."""
    old, fleet = LocalPrivacyMonitor(rc()), Fleet(40, 8)
    run_rounds(old, fleet, 1, 3)
    mon = resumed_from(tmp_path, old.state_dict())
    assert mon.section() == old.section()
    run_rounds(mon, fleet, 4, 5)
    again = resumed_from(tmp_path, mon.state_dict())
    assert again.section() == mon.section() and mon.state_dict()["lines"] == 3  # the table, then 2 rounds


def _child(run_dir: str) -> None:
    """Runs rounds forever, each recorded like the engine does (journal, then checkpoint)."""
    mon, fleet = attached(Path(run_dir)), Fleet(300, 40, seed=5)
    for rnd in range(1, 10**6):
        mon.observe_round(rnd, fleet.round(), {})
        run_folder.save_checkpoint(run_dir, {"round": rnd, "local_monitor": mon.state_dict()})
        print(rnd, flush=True)


def test_a_run_killed_with_sigkill_at_any_point_rebuilds_the_table_of_its_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    child = subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    reached = 0
    try:
        for line in child.stdout:
            reached = int(line)
            if reached >= 12:  # well into the run; it is somewhere in a round when the signal lands
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert reached >= 12, f"the child process stopped after round {reached} (run {__file__} {tmp_path} to see why)"
    checkpoint = torch.load(tmp_path / run_folder.CHECKPOINT, weights_only=False)
    last = checkpoint["round"]
    assert last >= 12
    mon = resumed_from(tmp_path, checkpoint["local_monitor"])
    reference, fleet = LocalPrivacyMonitor(rc()), Fleet(300, 40, seed=5)
    run_rounds(reference, fleet, 1, last)
    assert table(mon) == table(reference) and mon.section() == reference.section()
    assert mon.unattributed == reference.unattributed
    # The resumed run appends after what it kept: two more rounds, then a second resume, still the same.
    assert run_rounds(mon, advanced(Fleet(300, 40, seed=5), last), last + 1, last + 2) == \
        run_rounds(reference, fleet, last + 1, last + 2)
    assert resumed_from(tmp_path, mon.state_dict()).section() == reference.section()


@pytest.mark.usefixtures("flower_run_identity")
def test_a_run_keeps_the_table_in_its_journal_and_privacy_json_matches_the_rebuilt_table(tmp_path):
    config = ["num_clients=3", "clients_per_round=3", "sampling=all", "num_rounds=2", "privacy=local",
              "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0", "privacy.accountant=rdp",
              "train.batch_size=64", "privacy.local.grad_sample_mode=hooks", "tracking.progress=false"]
    run_federation(InProcessGrid(3), compose_config(config + [f"run_dir={tmp_path}"]))
    ref = torch.load(tmp_path / run_folder.CHECKPOINT, weights_only=False)["local_monitor"]
    assert "clients" not in ref and ref["round"] == 2 and ref["lines"] == 2
    mon = LocalPrivacyMonitor(compose_config(config))
    mon.attach(tmp_path, resumed=True)
    mon.load_state_dict(ref)
    published = json.loads((tmp_path / run_folder.PRIVACY).read_text())["local"]
    assert published["clients"] == json.loads(json.dumps(run_folder.jsonable(mon.section()["clients"])))
    assert run_folder.read_metrics(tmp_path)[-1]["local_epsilon_max"] == published["epsilon_max"]

    # A resume without the journal is refused before anything is touched; with it, the table is rebuilt.
    journal = tmp_path / run_folder.LOCAL_MONITOR_JOURNAL
    journal.rename(tmp_path / "elsewhere.jsonl")
    resume = compose_config(config + [f"run_dir={tmp_path}", "resume=true"])
    with pytest.raises(RunFolderError, match="local_monitor.jsonl is missing"):
        run_folder.check_run_folder(resume)
    (tmp_path / "elsewhere.jsonl").rename(journal)
    (tmp_path / run_folder.PRIVACY).unlink()
    run_federation(InProcessGrid(3), resume)  # nothing left to train: the report is written again
    assert json.loads((tmp_path / run_folder.PRIVACY).read_text())["local"]["clients"] == published["clients"]


if __name__ == "__main__":
    _child(sys.argv[1])
