"""dp-accounting, imported on first use.

Its package imports all of itself, scipy.signal and scipy.stats included (~1 s of CPU). The
accountant's modules are imported by every process that touches a ledger, a client worker under
central DP included, which never computes an epsilon: they call :func:`lib` where they need it.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=1)
def lib() -> SimpleNamespace:
    """``event`` (dp_event), ``pld`` (privacy_loss_distribution), ``rdp`` (rdp_privacy_accountant),
    ``relations`` (fedpriv's relation names -> NeighboringRelation)."""
    from dp_accounting import dp_event, privacy_accountant
    from dp_accounting.pld import privacy_loss_distribution
    from dp_accounting.rdp import rdp_privacy_accountant

    relations = {name: privacy_accountant.NeighboringRelation[name.upper()]
                 for name in ("add_or_remove_one", "replace_one")}  # fedpriv's two relations only
    return SimpleNamespace(event=dp_event, pld=privacy_loss_distribution, rdp=rdp_privacy_accountant,
                           relations=relations)
