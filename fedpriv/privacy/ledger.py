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
from .releases import REPLACE_ONE, DpRelease, make_release, neighboring_relation

__all__ = ["PrivacyLedger", "DpRelease", "effective_noise_multiplier",
           "total_noise_multiplier", "update_noise_for_total"]

_STATE_VERSION = 1


class PrivacyLedger:
    """Records Gaussian releases and answers "epsilon at delta".

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
        release = make_release(noise_multiplier, sampling_rate, sampling, count,
                               population, sample_size)
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
        """Epsilon of everything recorded so far, at ``delta``.

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
            "events": [
                {"noise_multiplier": r.noise_multiplier, "sampling_rate": r.sampling_rate,
                 "sampling": r.sampling, "count": r.count, "population": r.population,
                 "sample_size": r.sample_size}
                for r in self._events
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyLedger":
        """Rebuild a ledger; every event is validated again."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported ledger state version {state.get('version')!r}")
        ledger = cls(value_discretization_interval=state.get(
            "value_discretization_interval", DEFAULT_VALUE_DISCRETIZATION_INTERVAL))
        for e in state["events"]:
            ledger.record(**e)
        return ledger

    def __repr__(self) -> str:
        return (f"PrivacyLedger({len(self._events)} events, {self.num_releases} releases, "
                f"{self.neighboring_relation})")

