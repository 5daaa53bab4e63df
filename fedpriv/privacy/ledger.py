"""The privacy ledger: every DP release is an event; epsilon is read off them.

The ledger is unit-agnostic: the caller decides what one privacy unit is (a
client for central DP on the server, an example for DP-SGD on a client) and
records releases about those units. One ledger = one unit and one guarantee.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import accounting
from .accounting import DEFAULT_VALUE_DISCRETIZATION_INTERVAL
from .noise import effective_noise_multiplier, total_noise_multiplier, update_noise_for_total
from .releases import (REPLACE_ONE, DpRelease, make_laplace_release, make_pure_release, make_release,
                       neighboring_relation, release_from_dict)

__all__ = ["PrivacyLedger", "DpRelease", "effective_noise_multiplier",
           "total_noise_multiplier", "update_noise_for_total"]

_STATE_VERSION = 1


class PrivacyLedger:
    """Records releases (Gaussian, Laplace, any epsilon-DP) and answers "epsilon at delta".

    value_discretization_interval: PLD discretisation (smaller = tighter and
        slower; the PLD figure is an upper bound at any value).
    """

    def __init__(self, *, value_discretization_interval: float =
                 DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> None:
        if not value_discretization_interval > 0:
            raise ValueError("value_discretization_interval must be > 0")
        self._vdi = float(value_discretization_interval)
        self._events: list[DpRelease] = []

    # ------------------------------------------------------------------ record

    def record(self, noise_multiplier: float, sampling_rate: float, sampling: str,
               count: int = 1, population: int | None = None,
               sample_size: int | None = None) -> DpRelease:
        """Record ``count`` releases of the Gaussian mechanism.

        noise_multiplier: noise std / L2 bound of ONE unit's contribution
            (its add/remove sensitivity). 0 = no noise (epsilon becomes inf);
            inf is rejected (nothing released: do not record it).
        sampling_rate: probability that a given unit is in the release.
        sampling: "poisson" (independent inclusion with ``sampling_rate``),
            "fixed" (``sample_size`` units without replacement out of
            ``population``; RDP only, under replace-one, where the
            sensitivity is twice the clip norm so the noise multiplier is
            halved: see :mod:`fedpriv.privacy.accounting`), or "all" (every
            unit, no amplification, ``sampling_rate=1``).
        population, sample_size: only for "fixed".
        count: number of identical releases (e.g. DP-SGD steps).

        Consecutive identical releases merge. Returns the release recorded.
        Raises ``ValueError`` for invalid arguments or for mixing "poisson"
        and "fixed" in one ledger (no common neighbouring relation).
        """
        return self._add(make_release(noise_multiplier, sampling_rate, sampling, count,
                                      population, sample_size))

    def record_laplace(self, scale_over_sensitivity: float, count: int = 1, *, label: str,
                       sensitivity: float | None = None, scale: float | None = None,
                       mechanism: str = "laplace") -> DpRelease:
        """Record ``count`` releases of the Laplace mechanism (pure DP).

        scale_over_sensitivity: noise scale b / L1 sensitivity s of one unit's contribution
            under add/remove-one (epsilon = s / b each). Accounted exactly by dp-accounting's
            Laplace PLD (``LaplaceDpEvent`` with parameter b/s in RDP). 0 = no noise (inf).
        label: what was released (privacy.json lists it); sensitivity, scale: for the listing.
        No amplification by sampling is claimed (see :mod:`fedpriv.privacy.accounting`).
        In a replace-one ledger the sensitivity doubles (the parameter is halved).
        """
        return self._add(make_laplace_release(scale_over_sensitivity, count, label, sensitivity, scale,
                                              mechanism))

    def record_pure_dp(self, epsilon: float, count: int = 1, *, label: str, mechanism: str) -> DpRelease:
        """Record ``count`` releases of any (epsilon, 0)-DP mechanism (e.g. the exponential mechanism).

        epsilon: its guarantee under add/remove-one of a unit (doubled in a replace-one ledger).
        Accounted with the two-bucket randomized-response pair with the same epsilon, which
        dominates every epsilon-DP mechanism (Kairouz, Oh & Viswanath 2015), so the composed
        figure is a valid upper bound whatever the mechanism's outputs.
        """
        return self._add(make_pure_release(epsilon, count, label, mechanism))

    def extend(self, other: "PrivacyLedger") -> None:
        """Append another ledger's releases (same unit and relation) after this one's."""
        for r in other._events:
            self._add(r)

    def _add(self, release: DpRelease) -> DpRelease:
        neighboring_relation(self._events + [release])  # raises on a bad mix
        if self._events and self._events[-1].key == release.key:
            self._events[-1] = replace(self._events[-1],
                                       count=self._events[-1].count + release.count)
        else:
            self._events.append(release)
        return release

    # ------------------------------------------------------------------ views

    @property
    def events(self) -> list[DpRelease]:
        """The merged releases, oldest first (a copy)."""
        return list(self._events)

    @property
    def pure_events(self) -> list[DpRelease]:
        """The Laplace and other pure-DP releases, oldest first."""
        return [r for r in self._events if r.is_pure]

    def releases_table(self) -> list[dict[str, Any]]:
        """One row per pure release for privacy.json: label, mechanism, count, sensitivity, scale,
        epsilon of one release and of all ``count`` (delta 0, under this ledger's relation)."""
        replace_one = self.neighboring_relation == REPLACE_ONE
        return [{"label": r.label, "mechanism": r.mechanism, "count": r.count, "sensitivity": r.sensitivity,
                 "scale": r.scale, "epsilon_each": r.standalone_epsilon(replace_one),
                 "epsilon": r.count * r.standalone_epsilon(replace_one)} for r in self.pure_events]

    @property
    def num_releases(self) -> int:
        """Total number of releases (sum of counts)."""
        return sum(r.count for r in self._events)

    @property
    def value_discretization_interval(self) -> float:
        return self._vdi

    @property
    def neighboring_relation(self) -> str:
        """"add_or_remove_one", or "replace_one" once a 'fixed' release is in."""
        return neighboring_relation(self._events)

    def reported_accountant(self) -> str:
        """"pld" unless some release used fixed-size sampling, then "rdp"."""
        return accounting.reported_accountant(self._events)

    @property
    def caveats(self) -> list[str]:
        """Plain-language notes on how the reported figure was obtained."""
        notes = []
        if any(r.sampling == "fixed" for r in self._events):
            notes.append("fixed-size sampling: dp-accounting has no PLD for it, so the "
                         "reported epsilon is RDP (looser)")
        if self.neighboring_relation == REPLACE_ONE:
            notes.append("replace-one neighbouring relation (required by dp-accounting for "
                         "sampling without replacement): noise multipliers are halved "
                         "because replacing a unit moves a sum by twice the clip norm")
        if any(r.is_non_private for r in self._events):
            notes.append("a release with noise_multiplier=0 touched data: epsilon is infinite")
        return notes

    # ------------------------------------------------------------------ answers

    def _accountant(self, accountant: str | None) -> str:
        if accountant is None or accountant == "reported":
            return self.reported_accountant()
        return accountant

    def epsilon(self, delta: float, accountant: str | None = None) -> float:
        """Epsilon of everything recorded so far, at ``delta`` (0 allowed: pure releases only).

        accountant: "pld", "rdp", or None/"reported" (PLD where supported,
            else RDP). Asking for "pld" with fixed-size releases raises
            ``ValueError``. Results are cached.
        """
        return accounting.epsilon(tuple(self._events), float(delta),
                                  self._accountant(accountant), self._vdi)

    def delta_for_epsilon(self, epsilon: float, accountant: str | None = None) -> float:
        """Smallest delta the accountant proves at ``epsilon``."""
        return accounting.delta(tuple(self._events), float(epsilon),
                                self._accountant(accountant), self._vdi)

    def epsilon_report(self, delta: float) -> dict[str, Any]:
        """Both accountants and the reported figure, for logging.

        Keys: epsilon (reported), accountant ("pld"/"rdp"), pld (None when
        unsupported), rdp, delta, neighboring_relation, releases, caveats.
        """
        reported = self.reported_accountant()
        rdp = self.epsilon(delta, "rdp")
        pld = self.epsilon(delta, "pld") if reported == "pld" else None
        return {
            "epsilon": pld if reported == "pld" else rdp,
            "accountant": reported,
            "pld": pld,
            "rdp": rdp,
            "delta": float(delta),
            "neighboring_relation": self.neighboring_relation,
            "releases": self.num_releases,
            "caveats": self.caveats,
        }

    # ------------------------------------------------------------------ state

    def copy(self) -> "PrivacyLedger":
        other = PrivacyLedger(value_discretization_interval=self._vdi)
        other._events = list(self._events)
        return other

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state (save with checkpoints / context.state)."""
        return {
            "version": _STATE_VERSION,
            "value_discretization_interval": self._vdi,
            "events": [r.to_dict() for r in self._events],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyLedger":
        """Rebuild a ledger; every event is validated again."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported ledger state version {state.get('version')!r}")
        ledger = cls(value_discretization_interval=state.get(
            "value_discretization_interval", DEFAULT_VALUE_DISCRETIZATION_INTERVAL))
        for e in state["events"]:
            ledger._add(release_from_dict(e))
        return ledger

    @classmethod
    def from_events(cls, events: list[dict[str, Any]]) -> "PrivacyLedger":
        """A ledger of the releases a report lists (``state_dict()["events"]``); validated again."""
        return cls.from_state_dict({"version": _STATE_VERSION, "events": list(events)})

    def __repr__(self) -> str:
        return (f"PrivacyLedger({len(self._events)} events, {self.num_releases} releases, "
                f"{self.neighboring_relation})")

