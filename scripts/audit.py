"""Audit the privacy of a configuration: run it with canary clients and print what it leaks.

Each audited run is a normal ``scripts/simulate.py`` run with ``audit=central`` (fedpriv.audit):
canary clients are inserted, and privacy.json / summary.json get the audit beside the
accountant's epsilon. This script runs one or several of them in sequence and prints the table:

    # one audit of a configuration (any Hydra overrides)
    python scripts/audit.py dataset=fashion_mnist num_clients=1000 clients_per_round=100 num_rounds=10

    # the accountant vs the audit at several budgets, plus a non-private and a deliberately broken run
    python scripts/audit.py --epsilons 1,4,8 --nonprivate --broken dataset=fashion_mnist ...

    # the table of runs already made
    python scripts/audit.py --table-only outputs/audit/eps4 outputs/audit/eps8

A ``privacy_bug`` (a lower bound above the accountant's epsilon) is printed as a WARNING line; for
the non-private and broken runs it is the expected outcome (it shows the audit can see a leak).
The audited models include the canaries: they are for the audit, not for use.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.audit.report import format_table  # noqa: E402


def variants(args: argparse.Namespace) -> list[tuple[str, list[str], bool]]:
    """(label, extra overrides, privacy_bug expected) per run."""
    out: list[tuple[str, list[str], bool]] = []
    eps = [e for e in (args.epsilons or "").split(",") if e.strip()]
    for e in eps:
        out.append((f"eps{e}", ["privacy=central", f"privacy.target_epsilon={e}", "audit=central"], False))
    if not eps:
        out.append(("audit", ["audit=central"], False))
    # The non-private run needs some plan to scale to zero: the largest budget's. The broken run
    # claims the smallest budget (the strongest promise) and draws a tenth of its noise.
    hi = [f"privacy.target_epsilon={max(eps, key=float)}"] if eps else []
    lo = [f"privacy.target_epsilon={min(eps, key=float)}"] if eps else []
    if args.nonprivate:
        out.append(("nonprivate", ["privacy=central", *hi, "audit=nonprivate"], True))
    if args.broken:
        out.append(("broken", ["privacy=central", *lo, "audit=broken"], True))
    return out


def read_run(run_dir: Path, label: str | None = None) -> dict[str, Any]:
    row = json.loads((run_dir / "summary.json").read_text())
    privacy = run_dir / "privacy.json"
    if privacy.exists():
        audit = json.loads(privacy.read_text()).get("audit", {})
        row["privacy_bug_reasons"] = audit.get("privacy_bug_reasons", [])
    row["label"] = label or run_dir.name
    return row


def as_float(v: Any) -> Any:
    if v == "inf":
        return math.inf
    return v


def warnings_for(rows: list[dict[str, Any]], expected: dict[str, bool]) -> list[str]:
    lines = []
    for r in rows:
        if r.get("privacy_bug"):
            why = "; ".join(r.get("privacy_bug_reasons", [])) or "a lower bound exceeds the accountant's epsilon"
            note = " (expected: this run's noise was deliberately reduced)" if expected.get(r["label"]) else ""
            lines.append(f"WARNING privacy_bug in run {r['label']}{note}: {why}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the configuration to audit")
    parser.add_argument("--epsilons", help="comma-separated central-DP budgets, one audited run each")
    parser.add_argument("--nonprivate", action="store_true", help="add a run with no noise drawn (audit=nonprivate)")
    parser.add_argument("--broken", action="store_true", help="add a run with a tenth of the noise (audit=broken)")
    parser.add_argument("--out", default=None, help="folder for the runs (default outputs/audit/<time>)")
    parser.add_argument("--table-only", nargs="+", metavar="RUN_DIR", help="print the table of finished runs and stop")
    args = parser.parse_args()

    if args.table_only:
        rows = [read_run(Path(d)) for d in args.table_only]
        expected = {r["label"]: float(r.get("audit_noise_scale", 1.0)) != 1.0 for r in rows}
    else:
        out = Path(args.out or ROOT / "outputs" / "audit" / time.strftime("%Y-%m-%d_%H-%M-%S"))
        out.mkdir(parents=True, exist_ok=True)
        rows, expected = [], {}
        for label, extra, bug_expected in variants(args):
            run_dir = (out / label).resolve()
            cmd = [sys.executable, str(ROOT / "scripts" / "simulate.py"), *args.overrides, *extra,
                   f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", "tracking.progress=false"]
            print(f"audit: {label}: {' '.join(cmd[2:])}", flush=True)
            t0 = time.time()
            with open(out / f"{label}.log", "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            tail = (out / f"{label}.log").read_text().strip().splitlines()[-6:]
            for line in tail:
                if line.startswith("fedpriv:"):
                    print(f"  {line}", flush=True)
            if rc != 0 or not (run_dir / "summary.json").exists():
                print(f"audit: {label} failed (exit {rc}); see {out / f'{label}.log'}", file=sys.stderr)
                continue
            rows.append(read_run(run_dir, label))
            expected[label] = bug_expected
            print(f"audit: {label} done in {time.time() - t0:.0f} s", flush=True)
        (out / "audit_table.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")

    rows = [{k: as_float(v) for k, v in r.items()} for r in rows]
    table = format_table(rows)
    print(table)
    for line in warnings_for(rows, expected):
        print(line)
    if not args.table_only:
        (out / "audit_table.txt").write_text(table + "\n")
    unexpected = [r for r in rows if r.get("privacy_bug") and not expected.get(r["label"])]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
