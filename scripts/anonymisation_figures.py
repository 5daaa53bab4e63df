"""Print each client's anonymisation figures (what operator_only/anonymisation.json of a run holds):

    python scripts/anonymisation_figures.py                                  # heart_k5 and heart_k5_l2
    python scripts/anonymisation_figures.py anonymisation=heart_k5 anonymisation.k=10

Rows withheld, k and l achieved, each QI's generalisation level, information loss, and the
re-identification risk before and after (share of rows unique on the quasi-identifiers,
prosecutor risk 1 / smallest class). No training; the figures are raw, for the operator.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.anonymisation.report import client_reports
from fedpriv.compose import compose_config

COLUMNS = ("client", "rows", "withheld", "k", "l", "levels", "intensity", "DM/row", "unique before", "unique after",
           "prosecutor before", "prosecutor after", "homogeneous after")


def rows_of(overrides: list[str]) -> list[tuple]:
    rc = compose_config(["dataset=heart_disease", *overrides])
    out = []
    for r in client_reports(rc):
        loss, before, after = r["information_loss"], r["risk_before"], r["risk_after"]
        levels = " ".join(f"{q}:{g['level']}/{g['top']}" for q, g in r["generalisation"].items())
        out.append((r["name"] or r["client"], r["rows"], r["rows_suppressed"], r["k_achieved"], r["l_achieved"], levels,
                    f"{loss['generalisation_intensity']:.2f}", f"{loss['discernibility_per_row']:.1f}",
                    f"{before['unique_fraction']:.3f}", f"{after['unique_fraction']:.3f}",
                    f"{before['prosecutor_max']:.2f}", f"{after['prosecutor_max']:.3f}",
                    f"{after['homogeneous_fraction']:.2f}"))
    return out


def main(argv: list[str]) -> None:
    runs = [argv] if argv else [["anonymisation=heart_k5"], ["anonymisation=heart_k5_l2"]]
    for overrides in runs:
        print(f"## {' '.join(overrides)}")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in rows_of(overrides):
            print("| " + " | ".join(str(v) for v in row) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
