"""Privacy audits: what a run really leaks, beside the accountant's epsilon.

* :mod:`fedpriv.audit.canaries` -- canary clients inserted into a central-DP run (user level);
* :mod:`fedpriv.audit.one_shot` -- Andrew et al. (ICLR 2024): the one-shot epsilon estimate, and a
  Clopper-Pearson threshold lower bound;
* :mod:`fedpriv.audit.one_run` -- Steinke, Nasr & Jagielski (NeurIPS 2023): a lower bound from one
  run with randomly included canaries (user-level canaries here, or DP-SGD example canaries:
  :mod:`fedpriv.audit.example_level`);
* :mod:`fedpriv.audit.report` -- the privacy.json section, summary keys, ``privacy_bug``, the table.
"""

from .canaries import CanaryAudit, CanaryDirections
from .one_run import epsilon_lower_bound, one_run_audit, p_value
from .one_shot import (
    cosine_null_logsf,
    gaussian_mechanism_epsilon,
    gaussian_pair_epsilon,
    one_shot_estimate,
    threshold_lower_bound,
)
from .report import attach_audit, audit_section, format_table, summary_keys

__all__ = [
    "CanaryAudit",
    "CanaryDirections",
    "attach_audit",
    "audit_section",
    "cosine_null_logsf",
    "epsilon_lower_bound",
    "format_table",
    "gaussian_mechanism_epsilon",
    "gaussian_pair_epsilon",
    "one_run_audit",
    "one_shot_estimate",
    "p_value",
    "summary_keys",
    "threshold_lower_bound",
]
