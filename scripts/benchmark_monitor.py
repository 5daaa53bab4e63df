"""What the server's local-DP monitor costs a round once it has heard from many clients.

    PYTHONPATH=. python scripts/benchmark_monitor.py                  # 100,000 clients seen, rounds of 100
    python scripts/benchmark_monitor.py --seen 1000000 --lost 0.01     # 1% of ledgers lost (re-accounted)

Fills a monitor (``privacy=local``) with ``--seen`` clients, then times ``--rounds`` rounds of
``--per-round`` clients each as the engine runs them: the monitor's ``after_round``
(``observe_round``: the round's reports, its published max and mean and, for the current monitor,
the journal line appended and fsynced) and the checkpoint's share (``state_dict`` and writing it
durably with ``torch.save``, as ``run_folder.save_checkpoint`` does). It runs the monitor as it was
before the table moved to a journal (``--before-rev``, read with ``git show``) and the current one
on the same replies, and prints the median seconds per round of both, then what a resume costs
(loading the table from the checkpoint, or replaying the journal). ``--lost`` is the fraction of
clients whose ledger reports fewer rounds than the server saw (the old monitor re-accounted every
one of them every round).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedpriv import run_folder  # noqa: E402
from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.privacy.local_monitor import LocalPrivacyMonitor  # noqa: E402

BEFORE_REV = "84cdddc"  # the last commit whose monitor held the whole table in the checkpoint


class Reply:
    """A trained client's reply as the engine hands it over (metrics and the client's key)."""

    def __init__(self, cid: int, rounds: int, epsilon: float):
        self.content = {"metrics": {"num-examples": 60.0, "local_epsilon": epsilon, "local_rounds": float(rounds),
                                    "local_steps": 6.0, "local_noise_multiplier": 1.0,
                                    "local_sample_rate": 1 / 6, "declined": 0.0},
                        "client": {"key": f"client-{cid}"}}


def monitor_before(rev: str):
    """The monitor class as of ``rev`` (its module loaded from git, inside fedpriv.privacy)."""
    source = subprocess.run(["git", "show", f"{rev}:fedpriv/privacy/local_monitor.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("fedpriv.privacy._local_monitor_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fedpriv.privacy"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:fedpriv/privacy/local_monitor.py", "exec"), module.__dict__)  # noqa: S102
    return module.LocalPrivacyMonitor


class Fleet:
    """Every client's ledger rounds; a lost ledger reports one round whatever it trained."""

    def __init__(self, seen: int, lost: float, seed: int = 0):
        self.rng, self.seen = random.Random(seed), seen
        self.lost = set(self.rng.sample(range(seen), int(lost * seen)))
        self.rounds = [0] * seen

    def replies(self, clients) -> list[Reply]:
        out = []
        for c in clients:
            self.rounds[c] += 1
            reported = 1 if c in self.lost else self.rounds[c]
            out.append(Reply(c, reported, 0.5 + 0.1 * reported + self.rng.random() * 1e-3))
        return out


def fill(monitor, fleet: Fleet, chunk: int = 5000) -> None:
    """Hear from every client once (rounds of ``chunk``; the journal gets them too), then once
    more from the lost ones, so their ledgers read incomplete."""
    rnd = 0
    for start in range(0, fleet.seen, chunk):
        rnd += 1
        fill_round(monitor, rnd, fleet.replies(range(start, min(start + chunk, fleet.seen))))
    lost = sorted(fleet.lost)
    for start in range(0, len(lost), chunk):
        rnd += 1
        fill_round(monitor, rnd, fleet.replies(lost[start:start + chunk]))
    monitor.fill_rounds = rnd


def fill_round(monitor, rnd: int, replies: list[Reply]) -> None:
    if hasattr(monitor, "figures"):  # the current monitor: a round as the engine gives it
        monitor.observe_round(rnd, replies, {})
    else:  # the old one: straight into its table (its observe_round would re-read every client)
        for r in replies:
            monitor.observe_metrics(rnd, r.content["metrics"], r.content["client"]["key"])


def time_rounds(monitor, fleet: Fleet, run_dir: Path, rounds: int, per_round: int, seed: int) -> dict:
    rng = random.Random(seed)
    after, state, save, records = [], [], [], []
    for i in range(rounds):
        rnd = monitor.fill_rounds + 1 + i
        replies = fleet.replies(rng.sample(range(fleet.seen), per_round))
        record: dict = {}
        t0 = time.perf_counter()
        monitor.observe_round(rnd, replies, record)
        t1 = time.perf_counter()
        share = monitor.state_dict()
        t2 = time.perf_counter()
        run_folder.save_checkpoint(run_dir, {"round": rnd, "local_monitor": share})
        t3 = time.perf_counter()
        after.append(t1 - t0)
        state.append(t2 - t1)
        save.append(t3 - t2)
        records.append(record)
    return {"after_round": statistics.median(after), "state_dict": statistics.median(state),
            "save": statistics.median(save), "records": records,
            "checkpoint_bytes": (run_dir / run_folder.CHECKPOINT).stat().st_size}


def time_resume(cls, rc, run_dir: Path, attach: bool) -> tuple[float, object]:
    checkpoint = torch.load(run_dir / run_folder.CHECKPOINT, weights_only=False)
    monitor = cls(rc)
    t0 = time.perf_counter()
    if attach:
        monitor.attach(run_dir, resumed=True)
    monitor.load_state_dict(checkpoint["local_monitor"])
    return time.perf_counter() - t0, monitor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seen", type=int, default=100_000, help="clients heard from before the timed rounds")
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per monitor (median reported)")
    ap.add_argument("--lost", type=float, default=0.0, help="fraction of clients whose ledger was lost")
    ap.add_argument("--before-rev", default=BEFORE_REV)
    args = ap.parse_args()
    rc = compose_config(["privacy=local", "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0",
                         "privacy.accountant=rdp", "tracking.progress=false"])
    versions = {"before": monitor_before(args.before_rev), "now": LocalPrivacyMonitor}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in versions.items():
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            monitor, fleet = cls(rc), Fleet(args.seen, args.lost)
            if name == "now":
                monitor.attach(run_dir, resumed=False)
            t0 = time.perf_counter()
            fill(monitor, fleet)
            filled = time.perf_counter() - t0
            res = time_rounds(monitor, fleet, run_dir, args.rounds, args.per_round, seed=1)
            res["fill"] = filled
            res["resume"], again = time_resume(cls, rc, run_dir, attach=name == "now")
            res["same_after_resume"] = again.section()["clients"] == monitor.section()["clients"]
            journal = run_dir / run_folder.LOCAL_MONITOR_JOURNAL
            res["journal_bytes"] = journal.stat().st_size if journal.exists() else 0
            results[name] = res
    pairs = [(a[k], b[k]) for a, b in zip(results["before"]["records"], results["now"]["records"]) for k in a]
    worst = max(abs(a - b) / max(abs(a), 1e-300) for a, b in pairs)
    print(f"local-DP monitor, privacy=local: {args.seen:,} clients seen ({args.lost:.1%} with lost ledgers), "
          f"then {args.rounds} rounds of {args.per_round} clients; median seconds per round")
    print(f"{'monitor':<18}{'after_round':>13}{'state_dict':>12}{'ckpt write':>12}{'total':>10}"
          f"{'ckpt bytes':>14}{'journal bytes':>15}{'resume s':>10}")
    for name, r in results.items():
        total = r["after_round"] + r["state_dict"] + r["save"]
        label = f"{name} ({args.before_rev})" if name == "before" else name
        print(f"{label:<18}{r['after_round']:>13.4f}{r['state_dict']:>12.4f}{r['save']:>12.4f}{total:>10.4f}"
              f"{r['checkpoint_bytes']:>14,}{r['journal_bytes']:>15,}{r['resume']:>10.2f}")
    b, n = results["before"], results["now"]
    speedup = (b["after_round"] + b["state_dict"] + b["save"]) / (n["after_round"] + n["state_dict"] + n["save"])
    print(f"speed-up per round: {speedup:.0f}x; published max/mean: {sum(a == b for a, b in pairs)} of {len(pairs)} "
          f"identical, largest relative difference {worst:.1e} (the old mean summed floats in order, the new one "
          f"is the correctly rounded exact sum); resume rebuilds the same table: before {b['same_after_resume']}, "
          f"now {n['same_after_resume']}")


if __name__ == "__main__":
    main()
