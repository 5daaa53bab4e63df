"""What a round costs under cyclic sampling, for each central mechanism: the ledger's round-by-round view.

Under ``sampling=cyclic`` (:mod:`fedpriv.sampling`) a client belongs to one of ``G`` groups and may
only join every ``G``-th round, with probability ``q`` each time. What one client's data can change:

* ``gaussian`` (independent noise, DP-FedAvg) and ``bandmf`` (banded factorization with at most ``G``
  bands, columns of norm <= 1): a cycle of ``G`` rounds is, for one client, one Poisson-sampled Gaussian
  of multiplier ``z`` (Choquette-Choo et al. 2023, Thm 4: BandMF with cyclic Poisson sampling is as
  private as DP-SGD run for ``ceil(T / G)`` steps at rate ``q``; ``q = 1``: ``ceil(T / G)`` Gaussians,
  sensitivity ``sqrt(k)`` from disjoint bands; jax_privacy's ``amplified_bandmf_event`` reduces it the
  same way, to dp-accounting's DP-SGD event). The ledger records it at the cycle's first round, before
  any of the cycle's releases, so that every figure read mid-cycle is already an upper bound.
* ``tree`` (DP-FTRL, restarted every ``G`` rounds, no amplification claimed even when ``q < 1``): after
  position ``r`` of a tree, one client's update is in at most ``floor(log2 r) + 1`` released nodes, each
  with independent noise of multiplier ``z``: a Gaussian of sensitivity ``sqrt(nodes)``, i.e. the
  composition of ``nodes`` Gaussians of multiplier ``z``. The ledger records one at positions 1, 2, 4, 8, ...
  (exact: a composition of Gaussians is the Gaussian of the summed squared sensitivities). dp-accounting's
  ``SingleEpochTreeAggregationDpEvent`` states the same depth, ``ceil(log2(r + 1))``, for RDP only.

So every mechanism's ledger holds plain Gaussian releases that PLD accounts exactly; the tests check
each against an independent computation (the analytic Gaussian; Opacus's PRV accountant).
"""

from __future__ import annotations

from .ledger import PrivacyLedger
from .schedules import calibrate, constant


def charged(mechanism: str, cycle: int, server_round: int) -> bool:
    """Whether round ``server_round`` (1-based) records a release in the ledger."""
    position = (server_round - 1) % cycle + 1
    if mechanism == "tree":
        return position & (position - 1) == 0  # 1, 2, 4, 8, ...: a new node above the first leaf
    return position == 1  # gaussian, bandmf: a new cycle


def charged_rounds(mechanism: str, cycle: int, num_rounds: int) -> int:
    """How many of ``num_rounds`` rounds record a release."""
    return sum(charged(mechanism, cycle, t) for t in range(1, num_rounds + 1))


def release_sampling(mechanism: str, rate: float) -> tuple[float, str]:
    """(rate, scheme) of one recorded release: Poisson within the group, none for a tree or q = 1."""
    if mechanism == "tree" or rate >= 1.0:
        return 1.0, "all"
    return rate, "poisson"


def record(ledger: PrivacyLedger, mechanism: str, cycle: int, rate: float, noise_multiplier: float,
           server_round: int) -> None:
    """Record round ``server_round``'s release, if it costs anything (see the module's docstring)."""
    if charged(mechanism, cycle, server_round):
        q, scheme = release_sampling(mechanism, rate)
        ledger.record(noise_multiplier, q, scheme)


def calibrate_cyclic(mechanism: str, cycle: int, rate: float, num_rounds: int, delta: float,
                     target_epsilon: float, accountant: str | None) -> float:
    """The constant noise multiplier whose ``num_rounds`` rounds spend ``target_epsilon`` (within 1%, never above)."""
    q, scheme = release_sampling(mechanism, rate)
    releases = charged_rounds(mechanism, cycle, num_rounds)
    return calibrate(constant(1.0), releases, q, scheme, delta, target_epsilon,
                     accountant=accountant).noise_multipliers()[0]


def epsilons(mechanism: str, cycle: int, rate: float, noise_multipliers: list[float], delta: float,
             accountant: str | None) -> list[float]:
    """Epsilon after each round of a plan (it changes only at the charged rounds)."""
    ledger, out, eps = PrivacyLedger(), [], 0.0
    for t, z in enumerate(noise_multipliers, start=1):
        if charged(mechanism, cycle, t):
            record(ledger, mechanism, cycle, rate, z, t)
            eps = ledger.epsilon(delta, accountant)
        out.append(eps)
    return out
