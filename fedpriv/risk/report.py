"""Where the risk assessment goes: the operator-only file, privacy.json's ``risk`` section, the table.

The attack's figures are computed on the clients' private training rows and are not covered by
the run's guarantee: they go to ``operator_only/risk_assessment.json``. privacy.json's ``risk``
section holds what is public by construction (the ceilings computed from the published epsilon and
delta, the method, the pointer to the operator-only file); the empirical figures join it only when
the operator asks (``publish=True``), with a caveat saying they are raw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedpriv import run_folder
from fedpriv.privacy.disclosure import RISK_OUTPUT

UNIT_NOTE = (
    "The attack is example-level. Under central DP the guarantee is user-level (adding or removing one "
    "client with all its rows); an example belongs to exactly one client, and members differ from "
    "non-members here by the presence of their owner's rows, so the user-level bound covers the attack. "
    "Under local DP-SGD the guarantee is example-level (one example of one client replaced by a null "
    "example). The ceiling is for a test between the two neighbouring worlds; the measurement compares "
    "different rows (members against held-out rows of the same distribution), the same test averaged over "
    "rows when they are exchangeable. A figure above the ceiling calls for a look (distribution shift between "
    "members and held-out rows, or a privacy failure); one below it proves nothing about privacy."
)


USER_METHOD = (
    "user-level membership inference (clients that are people: Sent140 users, Shakespeare roles): score = - the "
    "model's mean cross-entropy over all of a user's rows; members = clients that took part, scored on the rows they "
    "trained on; non-members = the held-out test users and, when who took part is known, the clients that never did. "
    "Its ceilings: a user-level guarantee bounds it directly; an example-level one only by group privacy over the "
    "largest scored user's rows (r eps, r e^((r-1) eps) delta)"
)


def method_text(options: dict[str, Any]) -> str:
    lira = (
        f"; offline LiRA with one variance (Carlini et al., S&P 2022): {options['reference_models']} reference models "
        f"of the run's architecture trained centrally without DP for {options['reference_epochs']} epochs with the "
        f"run's client recipe on a {options['reference_fraction']:.0%} share of the non-member rows (never scored), "
        "score = (logit-scaled confidence of the true label - its mean under the reference models) / pooled std"
        if options["reference_models"] > 0 else ""
    )
    return (
        "example-level membership inference on the released model (model.pt): members = training rows of "
        "clients that took part, non-members = the test split, clients' validation rows (never trained on) and "
        "the training rows of clients that never took part (when known); loss-threshold attack (Yeom et al., "
        f"CSF 2018; score = -cross-entropy){lira}. Thresholds are chosen on the scored non-members (the "
        "attacker's best case); a TPR at FPR f needs at least 1/f non-members. Ceilings: Kairouz et al. "
        "(ICML 2015) region of (epsilon, delta)-DP: TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))"
    )


def _empirical(assessment: dict[str, Any]) -> dict[str, Any]:
    keep = ("members", "nonmembers", "auc", "tpr_at_fpr", "tpr_at_fpr_notes", "balanced_accuracy", "advantage", "unit")
    return {name: {k: v for k, v in fig.items() if k in keep} for name, fig in assessment["attacks"].items()}


def public_section(assessment: dict[str, Any], publish: bool) -> dict[str, Any]:
    """privacy.json's ``risk``: public by construction, plus the empirical figures if ``publish``."""
    section: dict[str, Any] = {
        "method": method_text(assessment["options"]),
        "unit": UNIT_NOTE,
        "ceilings": assessment["guarantees"],
        "ceiling": assessment["ceiling"],
        "audit": assessment.get("audit"),  # the canary audit's published figures (user level), if any
        "exposure": assessment.get("exposure"),  # planted secrets' exposure (published by the run), if any
        "operator_only": f"{run_folder.RISK_ASSESSMENT}: the attack's figures (raw, not covered by the guarantee)",
        "empirical_published": bool(publish),
    }
    if "user_loss" in assessment["attacks"]:
        section["user_method"] = USER_METHOD
    if publish:
        section["empirical"] = _empirical(assessment)
        section["empirical_caveat"] = (
            "NOT covered by the guarantee: computed on the clients' private training rows and published by the "
            "operator's choice (scripts/assess_risk.py --publish); they describe this model and these rows only"
        )
    return section


def write(run_dir: str | Path, assessment: dict[str, Any], publish: bool) -> dict[str, Any]:
    """Write the operator-only file and privacy.json's ``risk`` section; returns the section."""
    d = Path(run_dir)
    run_folder.write_json(d / run_folder.RISK_ASSESSMENT, assessment)
    path = d / run_folder.PRIVACY
    # A non-private run has no privacy.json: it gets one holding only the risk section.
    report = json.loads(path.read_text()) if path.exists() else {"mode": "none", "guarantee": "none (privacy=none)"}
    section = public_section(assessment, publish)
    report["risk"] = section
    outputs = report.get("outputs")
    if isinstance(outputs, dict):
        outputs[run_folder.RISK_ASSESSMENT] = RISK_OUTPUT
    run_folder.write_json(path, report)
    return section


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):
        return v
    return "inf" if math.isinf(v) else f"{v:.{digits}g}"


def format_table(assessment: dict[str, Any]) -> str:
    """The guarantee, the audit and the attacks side by side (plain text)."""
    fprs = list(assessment["ceiling"]["tpr_at_fpr"])
    head = ("", "unit", "epsilon (delta)", "AUC", *[f"TPR@{k}" for k in fprs], "balanced acc")
    lines = [head]
    for g in assessment["guarantees"]:
        label = "ceiling: none (no DP guarantee)" if g["guarantee"] == "none" else f"ceiling: {g['guarantee']} guarantee"
        lines.append((label, g["unit"], f"{_f(g['epsilon'])} ({_f(g['delta'])})",
                      _f(g["auc"]), *[_f(g["tpr_at_fpr"][k]) for k in fprs], _f(g["balanced_accuracy"])))
    audit = assessment.get("audit")
    if audit:
        found = (f"LB {_f(audit['lower_bound'])}, est. {_f(audit['estimate_final_model'])} final"
                 f" / {_f(audit['estimate_all_rounds'])} all rounds")
        lines.append(("canary audit", "user", found, "", *["" for _ in fprs], ""))
    exposure = assessment.get("exposure")
    if exposure:
        found = (f"mean {_f(exposure['exposure_planted_mean'])} bits (held-out {_f(exposure['exposure_held_out_mean'])}), "
                 f"ceiling {_f(exposure['exposure_ceiling'])}")
        lines.append((f"exposure: {exposure['exposure_secrets']} secrets", "secret", found, "", *["" for _ in fprs], ""))
    names = {"loss_threshold": "attack: loss threshold", "lira_offline": "attack: LiRA offline",
             "user_loss": "attack: mean loss per user"}
    for name, fig in assessment["attacks"].items():
        label = names.get(name, name) + (f" ({fig['reference_models']} refs)" if "reference_models" in fig else "")
        lines.append((label, fig.get("unit", "example"), f"{fig['members']} m / {fig['nonmembers']} nm", _f(fig["auc"]),
                      *[_f(fig["tpr_at_fpr"][k]) for k in fprs], _f(fig["balanced_accuracy"])))
        for g in fig.get("ceilings", []):  # the user attack's own ceilings (group privacy under example-level DP)
            lines.append((f"  ceiling for it: {g['guarantee']}", g["unit"], f"{_f(g['epsilon'])} ({_f(g['delta'])})",
                          _f(g["auc"]), *[_f(g["tpr_at_fpr"][k]) for k in fprs], _f(g["balanced_accuracy"])))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
    notes = [f"who took part: {assessment['participation']['source']}"]
    if assessment.get("member_dilution_note"):
        notes.append(assessment["member_dilution_note"])
    for fig in assessment["attacks"].values():
        notes += [f"TPR@{k}: {v}" for k, v in fig.get("tpr_at_fpr_notes", {}).items()]
    return text + "\n" + "\n".join(sorted(set(notes), key=notes.index))
