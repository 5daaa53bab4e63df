"""Local (example-level) differential privacy: a client's DP-SGD plan, its ledger, its budget.

Privacy unit: one training example of a client, under the **zero-out** (replace-by-null)
neighbouring relation: two data sets are neighbours when one example is replaced by a null
example that contributes a zero gradient. The client's row count ``n`` is public (it sets the
sampling rate ``q``, the step count and the ``num-examples`` a reply carries), so the figure is
*not* an add/remove-one guarantee, which would have to hide ``n``. Every DP-SGD step is a
Poisson-subsampled Gaussian mechanism over the client's ``n`` rows (each row joins the step's
batch with rate ``q``, its gradient is clipped to ``max_grad_norm``, noise of std
``z * max_grad_norm`` is added to the sum): under zero-out that is exactly the add/remove-one
pair of distributions of a Poisson-sampled row, which is what the ledger accounts.

This module holds what does not depend on Opacus (so that the launcher can check every
client's plan before anything starts, and the server can reason about clients' reports):

* the plan (:mod:`fedpriv.privacy.local_plan`, re-exported here): :func:`sampling_plan`,
  :func:`planned_participations`, :func:`planned_analytics` and :func:`noise_plan` -- how many rounds
  a client plans for, its own analytics releases, and the noise multiplier of each participation;
* :class:`ClientLedger` -- a client's composed history, kept in its own
  :class:`~fedpriv.client_state.ClientStateStore` under its stable key, never in the server's hands;
* :func:`decide_round` / :func:`commit_round` -- the budget decision before any data is touched,
  and the durable record of the release before the reply leaves the client.

Calibration: with a target, the client calibrates its noise for ``E`` participations of
``epochs * ceil(n / batch_size)`` steps each, with the run's schedule shape, so that its epsilon
after ``E`` rounds, its planned analytics releases (``analytics=local``) included, is at most the
target; a round (or a release) that would take it past the target is declined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedpriv.client_state import ClientStateError, ClientStateStore
from fedpriv.config import RunConfig

from .ledger import PrivacyLedger
from .local_plan import (SamplingPlan, budget_words, noise_plan, noise_plan_key, planned_analytics,
                         planned_participations, planned_split, planned_validations, sampling_plan)

__all__ = ["SamplingPlan", "sampling_plan", "planned_participations", "planned_validations", "planned_analytics",
           "noise_plan", "noise_plan_key", "planned_split", "budget_words", "ClientLedger", "load_client_ledger",
           "save_client_ledger", "RoundDecision", "decide_round", "commit_round"]

log = logging.getLogger("fedpriv.privacy.local")

STATE_PREFIX = "ledger-"
_STATE_VERSION = 2


# ----------------------------------------------------------------------------- the client's ledger


@dataclass
class ClientLedger:
    """One client's DP-SGD history: the ledger and what the report needs.

    Kept in the client's own :class:`~fedpriv.client_state.ClientStateStore` under its stable
    key (:func:`clients.identity.client_key`), never in the server's hands.
    """

    client_key: str
    ledger: PrivacyLedger
    rounds: int = 0  # rounds trained (declined rounds are not counted: nothing was released)
    steps: int = 0
    declined: int = 0
    last_round: int = 0
    plan_key: str = ""  # what the noise plan was calibrated for (recalibrated if it changes)
    plan: tuple[float, ...] = ()  # noise multiplier of each planned participation

    def to_record(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "client_key": self.client_key,
            "ledger": self.ledger.state_dict(),
            "rounds": int(self.rounds),
            "steps": int(self.steps),
            "declined": int(self.declined),
            "last_round": int(self.last_round),
            "plan_key": self.plan_key,
            "plan": [float(z) for z in self.plan],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "ClientLedger":
        if int(rec.get("version", -1)) != _STATE_VERSION:
            raise ClientStateError(f"unsupported client ledger version {rec.get('version')!r}")
        return cls(str(rec["client_key"]), PrivacyLedger.from_state_dict(rec["ledger"]),
                   int(rec["rounds"]), int(rec["steps"]), int(rec["declined"]), int(rec["last_round"]),
                   str(rec["plan_key"]), tuple(float(z) for z in rec["plan"]))


def load_client_ledger(store: ClientStateStore, client_key: str) -> ClientLedger:
    """The client's ledger from its own store (a fresh one on its first round)."""
    record = store.load(STATE_PREFIX + client_key)
    if record is None:
        return ClientLedger(client_key, PrivacyLedger())
    book = ClientLedger.from_record(record)
    if book.client_key != client_key:
        raise ClientStateError(f"client state for {client_key!r} holds the ledger of {book.client_key!r}")
    return book


def save_client_ledger(store: ClientStateStore, book: ClientLedger) -> None:
    """Durably, before anything the round produced leaves the client."""
    store.save(STATE_PREFIX + book.client_key, book.to_record())


# ------------------------------------------------------------------------- a round's decision


@dataclass
class RoundDecision:
    """What a client's next round would release, and whether its budget allows it."""

    book: ClientLedger
    plan: SamplingPlan
    noise_multiplier: float
    epsilon_before: float
    epsilon_after: float  # if the round is trained
    declined: bool
    next_ledger: PrivacyLedger

    def reply_metrics(self, steps_taken: int = 0) -> dict[str, float]:
        """The figures a reply carries: the row count and figures computed from it and from the
        ledger, none of which depends on the values of the client's examples."""
        trained = not self.declined
        return {
            "num-examples": float(self.plan.n),
            "local_epsilon": float(self.epsilon_after if trained else self.epsilon_before),
            "local_steps": float(steps_taken if trained else 0),
            "local_noise_multiplier": float(self.noise_multiplier),
            "local_sample_rate": float(self.plan.sample_rate),
            "local_rounds": float(self.book.rounds),
            "declined": 0.0 if trained else 1.0,
        }


def decide_round(rc: RunConfig, n_rows: int, store: ClientStateStore, client_key: str,
                 server_round: int) -> RoundDecision:
    """Load the client's ledger, calibrate its plan once, and decide before any data is touched.

    A declined round is recorded as declined (nothing is released); a trained one must be
    committed with :func:`commit_round` before the reply leaves the client.
    """
    lo = rc.privacy.local
    plan = sampling_plan(n_rows, rc.train.batch_size, rc.train.local_epochs)
    book = load_client_ledger(store, client_key)
    key = noise_plan_key(rc, plan)
    if book.plan_key != key or not book.plan:  # calibrate once; kept with the ledger
        book.plan_key, book.plan = key, noise_plan(rc, plan)
    z = book.plan[min(book.rounds, len(book.plan) - 1)]
    if lo.delta >= 1.0 / plan.n:
        log.warning("client %s: privacy.local.delta=%g is not below 1/n = 1/%d", client_key, lo.delta, plan.n)
    next_ledger = book.ledger.copy()
    next_ledger.record(z, plan.sample_rate, "poisson", count=plan.steps)
    eps_next = next_ledger.epsilon(lo.delta, rc.privacy.accountant)
    declined = lo.target_epsilon is not None and eps_next > lo.target_epsilon
    decision = RoundDecision(book, plan, z, float(book.ledger.epsilon(lo.delta, rc.privacy.accountant)),
                             float(eps_next), declined, next_ledger)
    if declined:
        book.declined += 1
        save_client_ledger(store, book)
        log.info("client %s declines round %d: epsilon would reach %.3f > budget %.3f",
                 client_key, server_round, eps_next, lo.target_epsilon)
    return decision


def commit_round(store: ClientStateStore, decision: RoundDecision, server_round: int) -> None:
    """Record the trained round's release durably: the model leaves the client only after this."""
    book = decision.book
    book.ledger = decision.next_ledger
    book.rounds += 1
    book.steps += decision.plan.steps
    book.last_round = int(server_round)
    save_client_ledger(store, book)
