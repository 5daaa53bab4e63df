"""The audit's section of privacy.json, its summary keys, the privacy-bug flag, and the table.

Every lower bound in one report is computed at ``(1 - confidence) / (number of lower bounds)``
(Bonferroni). The ``privacy_bug`` flag is raised when some lower bound exceeds the accountant's
epsilon. Its false-alarm probability is at most ``1 - confidence`` for a correct implementation
only when the flag comes from a one-run bound (Steinke, Nasr & Jagielski 2023, valid although the
canaries of one run share its noise and model): ``privacy_bug_rigorous`` says so. The
Clopper-Pearson threshold bounds treat the canaries as independent trials, which they are not
exactly, so a flag raised by them alone is a strong hint, not a bound with that error rate.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy import stats

from fedpriv.privacy import PrivacyLedger

from .canaries import CanaryAudit
from .one_run import one_run_audit
from .one_shot import cosine_null_logsf, one_shot_estimate, threshold_lower_bound

log = logging.getLogger("fedpriv.audit")

THREAT_MODELS = ("final_model", "all_rounds")
_LOWER_BOUNDS = 2 * len(THREAT_MODELS)  # threshold + one-run bound per threat model


def noise_drawn_epsilon(audit: CanaryAudit, delta: float) -> float:
    """Epsilon the accountant would give for the noise actually drawn (inf if a round had none)."""
    zs = audit.effective_multipliers()
    if not zs:
        return 0.0
    if min(zs) <= 0:
        return math.inf
    ledger = PrivacyLedger()
    for server_round, z in enumerate(zs, start=1):
        audit.plan.record_round(ledger, z, server_round)
    return float(ledger.epsilon(delta, audit.plan.accountant))


def audit_section(audit: CanaryAudit, claimed_epsilon: float, delta: float) -> dict[str, Any]:
    """The ``audit`` section of privacy.json for a finished (or stopped) run."""
    stats_by_model = audit.statistics()
    d = audit.dim or 0
    inserted = audit.inserted
    alpha_each = (1.0 - audit.confidence) / _LOWER_BOUNDS
    conf_each = 1.0 - alpha_each
    rounds = audit.rounds
    models: dict[str, Any] = {}
    for name in THREAT_MODELS:
        s = stats_by_model[name]
        if s.size == 0 or d < 2:
            models[name] = {"estimate": {"epsilon": math.nan}, "lower_bound": {"epsilon": 0.0}, "one_run_lower_bound": {"epsilon": 0.0}}
            continue
        x, y = s[inserted], s[~inserted]
        if name == "final_model":
            # Exact null: a never-inserted direction is independent of the final delta.
            null_mean, null_std, null = 0.0, 1.0 / math.sqrt(d), "exact: cosine of a uniform direction, mean 0, variance 1/d"

            def null_log_fpr(t: float) -> float:
                return float(cosine_null_logsf(t, d))
        else:
            # Max over rounds: no closed form (the rounds' releases are not orthogonal); the
            # estimate uses a Gaussian fit of the held-out canaries, the bound a union bound over rounds.
            null_mean, null_std = (float(y.mean()), float(y.std(ddof=1))) if y.size >= 2 else (0.0, 1.0 / math.sqrt(d))
            null = "empirical: Gaussian fit of the held-out canaries' max cosines"

            def null_log_fpr(t: float) -> float:
                return min(0.0, math.log(max(rounds, 1)) + float(cosine_null_logsf(t, d)))
        estimate = one_shot_estimate(x, delta, null_mean=null_mean, null_std=null_std, null=null)
        lower = threshold_lower_bound(x, y, delta, alpha_each, null_log_fpr=null_log_fpr)
        one_run = one_run_audit(s, inserted, delta, conf_each)
        models[name] = {"estimate": estimate, "lower_bound": lower, "one_run_lower_bound": one_run}

    held_out_final = stats_by_model["final_model"][~inserted] if stats_by_model["final_model"].size else np.zeros(0)
    null_check = None
    if held_out_final.size >= 8 and d >= 2:
        a = (d - 1) / 2.0
        null_check = float(stats.kstest((1 + held_out_final) / 2, stats.beta(a, a).cdf).pvalue)

    best_lb = max((max(m["lower_bound"]["epsilon"], m["one_run_lower_bound"]["epsilon"]) for m in models.values()), default=0.0)
    drawn = noise_drawn_epsilon(audit, delta) if audit.plan is not None else math.nan
    reasons, rigorous = [], False
    for name, m in models.items():
        for key in ("lower_bound", "one_run_lower_bound"):
            lb = m[key]["epsilon"]
            if lb > claimed_epsilon * (1 + 1e-9):
                reasons.append(f"{name} {key.replace('_', ' ')} {lb:.3f} > accountant epsilon {claimed_epsilon:.3f}")
                rigorous = rigorous or key == "one_run_lower_bound"
    never = int(np.sum(audit.participations[inserted] == 0))
    section = {
        "method": (
            "canary clients (Andrew et al., ICLR 2024): random unit directions x clip norm, each inserted into the "
            "population with probability 1/2 and sampled like every client; statistic = cosine with the final model "
            "delta (final_model) or max over rounds of the cosine with each round's noised average (all_rounds). "
            "estimate: Gaussian fits (not a bound); lower_bound: Clopper-Pearson thresholds (canaries treated as "
            "independent trials); one_run_lower_bound: Steinke, Nasr & Jagielski (NeurIPS 2023), no independence assumed"
        ),
        "canaries": audit.count,
        "inserted": int(inserted.sum()),
        "held_out": int((~inserted).sum()),
        "dimension": d,
        "noise_denominator": (audit.plan.denominator if audit.plan is not None else math.nan) + audit.expected_per_round,
        "rounds": rounds,
        "inserted_never_sampled": never,
        "mean_participations_of_inserted": float(audit.participations[inserted].mean()) if inserted.any() else 0.0,
        "confidence": audit.confidence,
        "confidence_each_lower_bound": conf_each,
        "delta": delta,
        "accountant_epsilon": claimed_epsilon,
        "noise_scale": audit.noise_scale,
        "accountant_epsilon_of_noise_drawn": drawn,
        "threat_models": models,
        "lower_bound": best_lb,
        "held_out_null_check_pvalue": null_check,
        "privacy_bug": bool(reasons),
        "privacy_bug_rigorous": rigorous,
        "privacy_bug_reasons": reasons,
        "false_alarm_rate": (
            f"at most {1 - audit.confidence:.3g} for a privacy_bug raised by a one_run_lower_bound (no independence "
            "assumed); none stated for one raised only by a Clopper-Pearson lower_bound (canaries treated as "
            "independent trials, which canaries sharing one run are not)"
        ),
        "model_includes_canaries": True,
    }
    return section


def summary_keys(section: dict[str, Any]) -> dict[str, Any]:
    """Flat keys for summary.json and the trackers (wandb)."""
    out: dict[str, Any] = {
        "audit_canaries": section["canaries"],
        "audit_inserted": section["inserted"],
        "audit_confidence": section["confidence"],
        "audit_accountant_epsilon": section["accountant_epsilon"],
        "audit_noise_scale": section["noise_scale"],
        "audit_accountant_epsilon_of_noise_drawn": section["accountant_epsilon_of_noise_drawn"],
        "audit_lower_bound": section["lower_bound"],
        "audit_model_includes_canaries": True,
        "privacy_bug": section["privacy_bug"],
        "privacy_bug_rigorous": section["privacy_bug_rigorous"],
    }
    for name, m in section["threat_models"].items():
        out[f"audit_{name}_estimate"] = m["estimate"]["epsilon"]
        out[f"audit_{name}_estimate_equal_variance"] = m["estimate"].get("epsilon_equal_variance", math.nan)
        out[f"audit_{name}_lower_bound"] = m["lower_bound"]["epsilon"]
        out[f"audit_{name}_one_run_lower_bound"] = m["one_run_lower_bound"]["epsilon"]
    return out


def attach_audit(report: dict[str, Any] | None, aggregator: Any) -> dict[str, Any] | None:
    """Add the audit of ``aggregator`` (if it ran one) to its privacy report, in place.

    Adds ``report["audit"]``, the ``audit_*`` / ``privacy_bug`` summary keys, and caveats: that the
    model includes canaries, that the noise was deliberately scaled, and a WARNING when a lower
    bound exceeds the accountant's epsilon (the launcher prints every caveat).
    """
    audit = getattr(aggregator, "audit", None)
    if report is None or audit is None:
        return report
    section = audit_section(audit, float(report["epsilon"]), float(report["delta"]))
    report["audit"] = section
    caveats = [
        f"AUDIT RUN: the model includes the updates of {section['inserted']} canary clients (random directions of norm "
        "clip_norm, inserted for the privacy audit); do not ship it, train the shipped model without audit"
    ]
    if section["noise_scale"] != 1.0:
        caveats.append(
            f"NOT PRIVATE AS CLAIMED: audit.noise_scale={section['noise_scale']:g} drew {section['noise_scale']:g} x the planned "
            f"noise (accountant epsilon of the noise drawn: {section['accountant_epsilon_of_noise_drawn']:.4g})"
        )
    if section["privacy_bug"]:
        msg = "WARNING privacy_bug: audit lower bound above the accountant's epsilon: " + "; ".join(section["privacy_bug_reasons"])
        caveats.insert(0, msg)
        log.warning(msg)
    summary = report.setdefault("summary", {})
    summary.update(summary_keys(section))
    summary["privacy_caveats"] = caveats + list(summary.get("privacy_caveats", []))
    report["caveats"] = caveats + list(report.get("caveats", []))
    return report


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per audited run (``summary_keys`` plus a ``label``)."""
    head = ("run", "accountant eps", "noise drawn eps", "estimate final", "estimate all-rounds", "LB final (CP/1-run)", "LB all-rounds (CP/1-run)", "bug")

    def f(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, str):
            return v
        return "inf" if math.isinf(v) else f"{v:.3g}"

    lines = [head]
    for r in rows:
        lines.append((
            str(r.get("label", "")),
            f(r.get("audit_accountant_epsilon")),
            f(r.get("audit_accountant_epsilon_of_noise_drawn", r.get("audit_accountant_epsilon"))),
            f(r.get("audit_final_model_estimate")),
            f(r.get("audit_all_rounds_estimate")),
            f"{f(r.get('audit_final_model_lower_bound'))} / {f(r.get('audit_final_model_one_run_lower_bound'))}",
            f"{f(r.get('audit_all_rounds_lower_bound'))} / {f(r.get('audit_all_rounds_one_run_lower_bound'))}",
            "PRIVACY BUG" if r.get("privacy_bug") else "ok",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)
