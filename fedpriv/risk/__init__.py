"""Privacy risk assessment of a released model: what a membership attacker learns, beside the ceiling
the run's (epsilon, delta) allows and the canary audit (:mod:`fedpriv.audit`).

* :mod:`fedpriv.risk.ceiling` -- the TPR / AUC / balanced-accuracy ceilings of (epsilon, delta)-DP;
* :mod:`fedpriv.risk.metrics` -- AUC, TPR at a fixed FPR (and whether the sample resolves it);
* :mod:`fedpriv.risk.membership` -- which rows are members (who took part) and non-members;
* :mod:`fedpriv.risk.attacks` -- loss threshold (Yeom et al. 2018), offline LiRA (Carlini et al. 2022);
* :mod:`fedpriv.risk.assess` -- one run's assessment (raw, operator-only);
* :mod:`fedpriv.risk.report` -- operator_only/risk_assessment.json, privacy.json's ``risk``, the table.

Entry point: ``scripts/assess_risk.py RUN_DIR``.
"""

from .assess import LoadedRun, RiskOptions, assess, load_run
from .ceiling import (
    advantage_ceiling,
    auc_ceiling,
    balanced_accuracy_ceiling,
    guarantees_of,
    tpr_ceiling,
)
from .metrics import attack_figures, auc, tpr_at_fpr
from .report import format_table, public_section, write

__all__ = [
    "LoadedRun",
    "RiskOptions",
    "advantage_ceiling",
    "assess",
    "attack_figures",
    "auc",
    "auc_ceiling",
    "balanced_accuracy_ceiling",
    "format_table",
    "guarantees_of",
    "load_run",
    "public_section",
    "tpr_at_fpr",
    "tpr_ceiling",
    "write",
]
