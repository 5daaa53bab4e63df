"""The risk assessment of one finished run: load it, pick the rows, run the attacks, gather figures.

Everything here is computed from the private training rows of the run's clients, so the result is
raw and operator-only (:mod:`fedpriv.risk.report` decides what reaches privacy.json).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedpriv import run_folder
from fedpriv.config import RunConfig, from_dict
from fedpriv.errors import RunFolderError
from fedpriv.task import dataset_for, new_model

from .attacks import lira_offline_scores, loss_scores, per_example, train_reference
from .ceiling import DEFAULT_FPRS, ceilings, combined, guarantees_of
from .membership import MembershipRows, membership_rows, participation
from .users import user_level_attack
from .metrics import attack_figures, fixed_threshold_figures

log = logging.getLogger("fedpriv.risk")


@dataclass
class RiskOptions:
    """How the attacks are run (none of it changes the run or its guarantee).

    ``reference_models``: LiRA's reference models (0: loss attack only); ``reference_epochs``: their
    central training epochs; ``reference_fraction``: share of the non-member rows given to them as the
    attacker's auxiliary data (never scored); ``max_members``: members scored (a uniform sample); ``max_users``: users per side of the per-user attack;
    ``seed``: the row split, the sample and the reference models' initialisation.
    """

    reference_models: int = 4
    reference_epochs: int = 5
    reference_fraction: float = 0.5
    max_members: int = 10_000
    max_users: int = 2_000  # users scored on each side of the per-user attack (data sets whose clients are people)
    seed: int = 0
    fprs: tuple[float, ...] = DEFAULT_FPRS


@dataclass
class LoadedRun:
    run_dir: Path
    rc: RunConfig
    model: torch.nn.Module
    report: dict[str, Any] | None
    summary: dict[str, Any]


def load_run(run_dir: str | Path) -> LoadedRun:
    """A finished run's configuration, released model and reports; :class:`RunFolderError` otherwise."""
    d = Path(run_dir)
    if not d.is_dir():
        raise RunFolderError(f"risk assessment: run folder {d} does not exist")
    missing = [n for n in (run_folder.CONFIG, run_folder.SUMMARY) if not (d / n).exists()]
    if missing:
        raise RunFolderError(f"risk assessment: {d} is not a finished fedpriv run folder (no {', '.join(missing)})")
    if not (d / run_folder.MODEL).exists():
        raise RunFolderError(f"risk assessment: {d} holds no {run_folder.MODEL} (the run released no model)")
    try:
        rc = from_dict(yaml.safe_load((d / run_folder.CONFIG).read_text()) or {})
    except (ValueError, yaml.YAMLError) as exc:
        raise RunFolderError(f"risk assessment: {d / run_folder.CONFIG} is not a fedpriv configuration ({exc})") from None
    if rc.client_mode != "virtual":
        raise RunFolderError("risk assessment: a deployment run (client_mode=nodes) keeps its rows on the SuperNodes; "
                             "the assessment needs them and supports simulated runs (client_mode=virtual)")
    dataset_for(rc)  # the rows must be here (DataError, one line, before any work)
    model = new_model(rc)
    try:
        model.load_state_dict(torch.load(d / run_folder.MODEL, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a foreign or damaged file
        raise RunFolderError(f"risk assessment: {d / run_folder.MODEL} is not this run's model ({type(exc).__name__})") from None
    privacy = d / run_folder.PRIVACY
    report = json.loads(privacy.read_text()) if privacy.exists() else None
    return LoadedRun(d, rc, model, report, json.loads((d / run_folder.SUMMARY).read_text()))


def _split(rows: MembershipRows, options: RiskOptions) -> dict[str, np.ndarray]:
    """Scored members, scored non-members and the reference models' rows, by the options' seed."""
    rng = np.random.default_rng(options.seed)
    members = rng.permutation(len(rows.y_members))[: options.max_members]
    pool = rng.permutation(len(rows.y_nonmembers))
    n_ref = int(options.reference_fraction * len(pool)) if options.reference_models > 0 else 0
    return {"members": members, "reference": pool[:n_ref], "nonmembers": pool[n_ref:]}


def audit_figures(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The canary audit's published figures (user level), if the run had one."""
    audit = (report or {}).get("audit")
    if not isinstance(audit, dict):
        return None
    models = audit.get("threat_models", {})
    return {
        "unit": "user (client): canary clients",
        "accountant_epsilon": audit.get("accountant_epsilon"),
        "lower_bound": audit.get("lower_bound"),
        "estimate_final_model": (models.get("final_model") or {}).get("estimate", {}).get("epsilon"),
        "estimate_all_rounds": (models.get("all_rounds") or {}).get("estimate", {}).get("epsilon"),
        "privacy_bug": audit.get("privacy_bug"),
        "model_includes_canaries": audit.get("model_includes_canaries", True),
    }


def exposure_figures(run_dir: Path) -> dict[str, Any] | None:
    """The planted secrets' exposure (``exposure.json``, published: post-processing), if the run planted any."""
    path = run_dir / run_folder.EXPOSURE
    if not path.exists():
        return None
    ex = json.loads(path.read_text())
    return {k: ex.get(k) for k in ("exposure_secrets", "exposure_repeats", "exposure_planted_mean", "exposure_planted_max",
                                   "exposure_held_out_mean", "exposure_ceiling", "exposure_measurable_bits")}


def assess(run: LoadedRun, options: RiskOptions, sampler_seed: int | None = None) -> dict[str, Any]:
    """The full (operator-only) assessment of ``run``. ``sampler_seed``: the run's client-sampler seed
    when it was seeded (the launcher knows it), to replay who was sampled; None otherwise."""
    rc = run.rc
    rounds = int(run.summary.get("rounds_completed", rc.num_rounds))
    part = participation(rc, run.run_dir, run.report, rounds, sampler_seed)
    rows = membership_rows(rc, part)
    idx = _split(rows, options)
    xm, ym = rows.x_members[idx["members"]], rows.y_members[idx["members"]]
    xn, yn = rows.x_nonmembers[idx["nonmembers"]], rows.y_nonmembers[idx["nonmembers"]]
    log.info("risk: scoring %d members and %d non-members", len(ym), len(yn))
    loss_m, conf_m = per_example(run.model, xm, ym)
    loss_n, conf_n = per_example(run.model, xn, yn)

    attacks: dict[str, Any] = {}
    loss_fig = attack_figures(loss_scores(loss_m), loss_scores(loss_n), options.fprs)
    loss_fig["yeom_rule"] = fixed_threshold_figures(loss_scores(loss_m), loss_scores(loss_n), -float(np.mean(loss_m)))
    loss_fig["mean_loss_members"], loss_fig["mean_loss_nonmembers"] = float(np.mean(loss_m)), float(np.mean(loss_n))
    attacks["loss_threshold"] = loss_fig
    if options.reference_models > 0:
        xr, yr = rows.x_nonmembers[idx["reference"]], rows.y_nonmembers[idx["reference"]]
        ref_m, ref_n = [], []
        for k in range(options.reference_models):
            log.info("risk: reference model %d/%d on %d rows", k + 1, options.reference_models, len(yr))
            ref = train_reference(rc, xr, yr, epochs=options.reference_epochs, seed=options.seed * 1000 + 101 + k)
            ref_m.append(per_example(ref, xm, ym)[1])
            ref_n.append(per_example(ref, xn, yn)[1])
        scores, extra = lira_offline_scores(np.concatenate([conf_m, conf_n]), np.hstack([np.stack(ref_m), np.stack(ref_n)]))
        lira = attack_figures(scores[: len(ym)], scores[len(ym):], options.fprs)
        lira.update(extra, reference_models=options.reference_models, reference_epochs=options.reference_epochs,
                    reference_rows=len(yr))
        attacks["lira_offline"] = lira
    users = user_level_attack(rc, run.model, part, guarantees_of(run.report), options.fprs, options.max_users,
                              options.seed)
    if users is not None:  # clients are people (natural ids): can one tell that a user's data trained the model?
        attacks["user_loss"] = users

    sections = [ceilings(g, options.fprs) for g in guarantees_of(run.report)]
    f = part.expected_never_sampled_fraction
    return {
        "run_dir": str(run.run_dir),
        "privacy_mode": rc.privacy.mode,
        "final_accuracy": run.summary.get("final_accuracy"),
        "participation": {
            "source": part.source,
            "clients_known": part.clients is not None,
            "participants": None if part.clients is None else len(part.clients),
            "clients": rc.num_clients,
            "expected_never_sampled_fraction": f,
        },
        "rows": {
            "member_rows": len(rows.y_members),
            "members_scored": len(ym),
            "nonmember_pool": rows.nonmember_sources,
            "nonmembers_scored": len(yn),
            "reference_rows": len(idx["reference"]),
        },
        "options": {k: v for k, v in vars(options).items()},
        "guarantees": sections,
        "ceiling": combined(sections),
        "audit": audit_figures(run.report),
        "exposure": exposure_figures(run.run_dir),
        "attacks": attacks,
        "member_dilution_note": (
            None if part.clients is not None else
            f"an expected {f:.2%} of the member rows belong to clients never sampled: the measured TPR is about "
            f"(1 - {f:.3g}) x the TPR on true members + {f:.3g} x the FPR, so the figures here are a lower estimate"
            if math.isfinite(f) else None
        ),
    }
