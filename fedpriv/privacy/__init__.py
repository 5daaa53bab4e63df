"""Privacy accounting for fedpriv: a ledger of DP releases, budgets, schedules.

Pure Python + dp-accounting. The privacy unit (client, example, ...) is the
caller's choice; see :mod:`fedpriv.privacy.releases` for the noise convention.
"""

from .accounting import DEFAULT_VALUE_DISCRETIZATION_INTERVAL, RDP_ORDERS
from .budget import BudgetExceeded, check_delta, default_delta, ensure_within_budget, would_exceed
from .ledger import PrivacyLedger
from .noise import effective_noise_multiplier, total_noise_multiplier, update_noise_for_total
from .releases import SAMPLINGS, DpRelease
from .schedules import (
    NoiseSchedule,
    Shape,
    calibrate,
    constant,
    cosine,
    linear,
    phases,
    planned_epsilons,
    planned_ledger,
    step,
)

__all__ = [
    "DEFAULT_VALUE_DISCRETIZATION_INTERVAL",
    "RDP_ORDERS",
    "SAMPLINGS",
    "BudgetExceeded",
    "DpRelease",
    "NoiseSchedule",
    "PrivacyLedger",
    "Shape",
    "calibrate",
    "check_delta",
    "constant",
    "cosine",
    "default_delta",
    "effective_noise_multiplier",
    "ensure_within_budget",
    "linear",
    "phases",
    "planned_epsilons",
    "planned_ledger",
    "step",
    "total_noise_multiplier",
    "update_noise_for_total",
    "would_exceed",
]
