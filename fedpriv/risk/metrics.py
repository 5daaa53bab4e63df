"""Figures of a membership attack from its scores: AUC, TPR at a low FPR, balanced accuracy.

A score is larger for "more likely a member". The figures are the usual ones of Carlini et al.
(S&P 2022): the ROC curve over every threshold, its area, and the TPR at FPR 0.1% and 1%, where
each threshold is chosen on the very non-members it is evaluated on (the attacker's best case, as
in the literature). A TPR at FPR ``f`` is only *resolvable* with at least ``1 / f`` non-members (one
false positive allowed): below that the figure is reported as ``None`` with the reason, never as a
number that the sample cannot support.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from .ceiling import DEFAULT_FPRS, fpr_key


def roc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over every threshold, members as the positive class."""
    y, s = _labelled(member_scores, nonmember_scores)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(a member's score > a non-member's) + P(tie) / 2."""
    y, s = _labelled(member_scores, nonmember_scores)
    return float(roc_auc_score(y, s))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR among thresholds whose empirical FPR is at most ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def resolvable(nonmembers: int, target: float) -> bool:
    """Whether ``nonmembers`` rows can measure an FPR of ``target`` (at least one false positive)."""
    return nonmembers * target >= 1.0 - 1e-9


def attack_figures(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                   fprs: tuple[float, ...] = DEFAULT_FPRS) -> dict[str, Any]:
    """Every figure of one attack, JSON-ready (raw: computed on private training rows)."""
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    if m.size == 0 or n.size == 0:
        raise ValueError("an attack needs at least one member and one non-member")
    fpr, tpr, _ = roc(m, n)
    tpr_at: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for f in fprs:
        if resolvable(n.size, f):
            tpr_at[fpr_key(f)] = tpr_at_fpr(fpr, tpr, f)
        else:
            tpr_at[fpr_key(f)] = None
            notes[fpr_key(f)] = (f"not resolvable: {n.size} non-members allow no false positive at FPR {f:g} "
                                 f"(needs at least {math.ceil(1 / f)})")
    advantage = float(np.max(tpr - fpr))
    return {
        "members": int(m.size),
        "nonmembers": int(n.size),
        "auc": auc(m, n),
        "tpr_at_fpr": tpr_at,
        "tpr_at_fpr_notes": notes,
        "balanced_accuracy": 0.5 * (1.0 + advantage),
        "advantage": advantage,
    }


def fixed_threshold_figures(member_scores: np.ndarray, nonmember_scores: np.ndarray, threshold: float) -> dict[str, float]:
    """TPR, FPR and balanced accuracy of "member if score >= threshold" (Yeom et al.'s rule)."""
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    tpr = float(np.mean(m >= threshold))
    fpr = float(np.mean(n >= threshold))
    return {"threshold": float(threshold), "tpr": tpr, "fpr": fpr, "balanced_accuracy": 0.5 * (1.0 + tpr - fpr)}


def _labelled(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member_scores, dtype=float).ravel()
    n = np.asarray(nonmember_scores, dtype=float).ravel()
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("attack scores must be finite")
    return np.concatenate([np.ones(m.size), np.zeros(n.size)]), np.concatenate([m, n])
