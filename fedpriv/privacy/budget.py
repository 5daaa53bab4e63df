"""Privacy budget: choosing delta, and refusing a release that would overspend."""

from __future__ import annotations

from typing import Any, Mapping

from fedpriv.errors import FedprivError

from .ledger import PrivacyLedger


class BudgetExceeded(FedprivError, RuntimeError):
    """Raised instead of making a release that would exceed the budget."""

    def __init__(self, epsilon: float, target_epsilon: float, delta: float) -> None:
        super().__init__(f"next release would spend epsilon={epsilon:.4g} > budget "
                         f"{target_epsilon:.4g} at delta={delta:.3g}")
        self.epsilon = epsilon
        self.target_epsilon = target_epsilon
        self.delta = delta


def default_delta(num_clients: int) -> float:
    """``min(1e-5, 1 / num_clients**1.1)``.

    delta is the probability that the epsilon guarantee fails; it must be
    well below 1/N for N units, or a mechanism that publishes one unit's data
    at random would pass. The exponent 1.1 keeps it clearly below 1/N for large
    N, and 1e-5 caps it for small ones. ``num_clients`` is the number of
    privacy units (clients for central DP, examples for DP-SGD).
    """
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    return min(1e-5, 1.0 / num_clients**1.1)


def check_delta(delta: float, population: int) -> None:
    """Raise ``ValueError`` unless ``0 < delta < 1/population``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population!r}")
    if delta >= 1.0 / population:
        raise ValueError(f"delta={delta:g} >= 1/population=1/{population}: the guarantee "
                         f"would allow leaking one unit outright; use delta < {1 / population:g}")


def would_exceed(ledger: PrivacyLedger, next_event_kwargs: Mapping[str, Any],
                 target_epsilon: float, delta: float, accountant: str | None = None) -> bool:
    """True if recording ``next_event_kwargs`` (the arguments of
    :meth:`PrivacyLedger.record`) would take epsilon at ``delta`` above
    ``target_epsilon``. The ledger itself is not changed."""
    trial = ledger.copy()
    trial.record(**next_event_kwargs)
    return trial.epsilon(delta, accountant) > target_epsilon


def ensure_within_budget(ledger: PrivacyLedger, next_event_kwargs: Mapping[str, Any],
                         target_epsilon: float, delta: float,
                         accountant: str | None = None) -> None:
    """Raise :class:`BudgetExceeded` if the next release would overspend."""
    trial = ledger.copy()
    trial.record(**next_event_kwargs)
    eps = trial.epsilon(delta, accountant)
    if eps > target_epsilon:
        raise BudgetExceeded(eps, target_epsilon, delta)
