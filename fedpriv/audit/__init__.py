"""Privacy audits: what a run really leaks, beside the accountant's epsilon.

* :mod:`fedpriv.audit.canaries` -- canary clients inserted into a central-DP run (user level);
* :mod:`fedpriv.audit.one_shot` -- Andrew et al. (ICLR 2024): the one-shot epsilon estimate, and a
  Clopper-Pearson threshold lower bound;
* :mod:`fedpriv.audit.one_run` -- Steinke, Nasr & Jagielski (NeurIPS 2023): a lower bound from one
  run with randomly included canaries (user-level canaries here, or DP-SGD example canaries:
  :mod:`fedpriv.audit.example_level`);
* :mod:`fedpriv.audit.report` -- the privacy.json section, summary keys, ``privacy_bug``, the table.
"""

from __future__ import annotations

import importlib

# Names load with their module on first use (PEP 562): fedpriv.task imports fedpriv.audit.exposure
# for planted secrets, and a client worker would otherwise pay scipy.stats (~0.5 s) at start.
_WHERE = {
    "CanaryAudit": "canaries", "CanaryDirections": "canaries",
    "epsilon_lower_bound": "one_run", "one_run_audit": "one_run", "p_value": "one_run",
    "cosine_null_logsf": "one_shot", "gaussian_mechanism_epsilon": "one_shot",
    "gaussian_pair_epsilon": "one_shot", "one_shot_estimate": "one_shot", "threshold_lower_bound": "one_shot",
    "attach_audit": "report", "audit_section": "report", "format_table": "report", "summary_keys": "report",
}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
