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

* :func:`sampling_plan` -- the Poisson rate and step count Opacus uses for ``n`` rows;
* :func:`planned_participations` and :func:`noise_plan` -- how many rounds a client plans for and
  the noise multiplier of each, calibrated to ``privacy.local.target_epsilon``;
* :class:`ClientLedger` -- a client's composed history, kept in its own
  :class:`~fedpriv.client_state.ClientStateStore` under its stable key, never in the server's hands;
* :func:`decide_round` / :func:`commit_round` -- the budget decision before any data is touched,
  and the durable record of the release before the reply leaves the client.

Calibration: with a target, the client calibrates its noise for ``E`` participations of
``epochs * ceil(n / batch_size)`` steps each, with the run's schedule shape, so that its epsilon
after ``E`` rounds is at most the target; a round that would take it past the target is declined.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedpriv.client_state import ClientStateError, ClientStateStore
from fedpriv.config import ConfigError, RunConfig

from . import schedules
from .ledger import PrivacyLedger
from .plan import schedule_shape

log = logging.getLogger("fedpriv.privacy.local")

STATE_PREFIX = "ledger-"
_STATE_VERSION = 2


# --------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingPlan:
    """What one round of DP-SGD on ``n`` rows costs: ``steps`` Poisson steps at rate ``q``."""

    n: int
    batch_size: int
    epochs: int
    sample_rate: float  # each row's chance to be in one step's batch
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def expected_batch_size(self) -> int:
        """Opacus divides the noisy sum by this (never by the batch's real size, which is private)."""
        return int(self.n * self.sample_rate)


def sampling_plan(n: int, batch_size: int, epochs: int) -> SamplingPlan:
    """The Poisson rate and step count Opacus uses for a loader of ``batch_size`` over ``n`` rows."""
    if n < 1:
        raise ConfigError(f"DP-SGD needs at least one training row, got {n}")
    if batch_size < 1 or epochs < 1:
        raise ConfigError(f"config key 'train': batch_size and local_epochs must be >= 1, got {batch_size}, {epochs}")
    batches = math.ceil(n / batch_size)  # len(DataLoader(..., batch_size, drop_last=False))
    q = 1 / batches  # DPDataLoader.from_data_loader: sample_rate = 1 / len(data_loader)
    return SamplingPlan(n, batch_size, epochs, q, int(1 / q))  # UniformWithReplacementSampler.steps


# ---------------------------------------------------------------------- the client's privacy plan


def planned_participations(rc: RunConfig) -> int:
    """Rounds a client calibrates its noise for.

    ``privacy.local.expected_rounds`` when set. Otherwise a client joins each of ``T`` rounds with
    probability ``p`` (1 under ``sampling=all``, ``clients_per_round / num_clients`` otherwise), so
    its participations are Binomial(T, p); it plans for ``min(T, ceil(Tp + 2 sqrt(Tp(1-p))))``
    (about the 98th percentile): most clients never meet the budget stop, at the price of a
    little more noise per round than planning for the mean ``Tp`` would give.
    """
    lo = rc.privacy.local
    if lo.expected_rounds is not None:
        if lo.expected_rounds < 1:
            raise ConfigError(f"config key 'privacy.local.expected_rounds': must be >= 1, got {lo.expected_rounds}")
        return int(lo.expected_rounds)
    t = rc.num_rounds
    p = 1.0 if rc.sampling == "all" else min(1.0, rc.clients_per_round / rc.num_clients)
    return max(1, min(t, math.ceil(t * p + 2 * math.sqrt(t * p * (1 - p)) - 1e-9)))


def _relative_plan(shape: schedules.Shape, num_rounds: int, participations: int) -> tuple[float, ...]:
    """The run's shape over ``num_rounds`` server rounds, compressed onto a client's
    ``participations``: its k-th participation takes the value at the same fraction of the run."""
    over_run = shape.values(num_rounds)
    return tuple(over_run[min(num_rounds - 1, (k * num_rounds) // participations)] for k in range(participations))


@lru_cache(maxsize=256)
def _calibrated_plan(rel: tuple[float, ...], sample_rate: float, steps: int, delta: float,
                     target: float, accountant: str) -> tuple[float, ...]:
    shape = schedules.phases([(1, v) for v in rel])
    try:
        sched = schedules.calibrate(shape, len(rel), sample_rate, "poisson", delta, target,
                                    steps_per_round=steps, accountant=accountant)
    except ValueError as exc:
        raise ConfigError(f"config key 'privacy.local.target_epsilon': {target:g} cannot be reached: {exc}") from None
    return tuple(sched.noise_multipliers())


def noise_plan_key(rc: RunConfig, plan: SamplingPlan) -> str:
    """Everything a client's noise plan depends on, as a string."""
    lo = rc.privacy.local
    e = planned_participations(rc)
    return json.dumps({
        "rel": _relative_plan(schedule_shape(rc), rc.num_rounds, e),
        "q": plan.sample_rate, "steps": plan.steps, "delta": lo.delta, "target": lo.target_epsilon,
        "z": lo.noise_multiplier, "accountant": rc.privacy.accountant,
    }, sort_keys=True)


def noise_plan(rc: RunConfig, plan: SamplingPlan) -> tuple[float, ...]:
    """Noise multiplier of a client's 1st, 2nd, ... participation (its last value beyond).

    With ``noise_multiplier`` set: that value, then following the shape. Else calibrated so the planned
    participations reach at most ``target_epsilon`` (the same search as central DP's schedules).
    """
    lo = rc.privacy.local
    e = planned_participations(rc)
    rel = _relative_plan(schedule_shape(rc), rc.num_rounds, e)
    if lo.noise_multiplier is not None:  # the first participation gets it, as under central DP
        return tuple(float(lo.noise_multiplier) * v / rel[0] for v in rel)
    if lo.target_epsilon is None:
        raise ConfigError("config key 'privacy.local': give target_epsilon or noise_multiplier")
    return _calibrated_plan(rel, plan.sample_rate, plan.steps, float(lo.delta), float(lo.target_epsilon),
                            rc.privacy.accountant)


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
