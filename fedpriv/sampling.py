"""Which clients take part in a round. The scheme must be the one the privacy accountant assumes.

- ``poisson``: each client joins independently with probability q (amplification by Poisson sampling),
  drawn in O(cohort), not O(population), time and memory;
- ``fixed``: exactly ``expected_size`` clients, uniformly without replacement;
- ``all``: every client every round (no amplification);
- ``cyclic``: the clients are split into ``G`` fixed groups (client ``i`` in group ``i mod G``); round
  ``t`` draws only from group ``(t - 1) mod G``, each member independently with probability
  ``q = min(1, clients_per_round * G / num_clients)``. Every client's participations are therefore at
  least ``G`` rounds apart and at most ``ceil(T / G)`` in ``T`` rounds: the participation schema of
  banded matrix factorization's amplified accounting (Choquette-Choo et al. 2023, cyclic Poisson) and
  of DP-FTRL's tree restarted every ``G`` rounds (each client at most once per tree). With ``q = 1``
  each group joins whole: every client exactly once every ``G`` rounds, no randomness at all.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


SCHEMES = ("poisson", "fixed", "all", "cyclic")


def cyclic_groups(num_clients: int, clients_per_round: int, groups: int | None = None) -> int:
    """The groups asked for, or when ``cyclic_groups`` is unset as many as fit whole cohorts (``q = 1``:
    one epoch per cycle)."""
    return groups or max(1, num_clients // max(1, clients_per_round))


def cyclic_rate(num_clients: int, clients_per_round: int, groups: int) -> float:
    """Each member's chance of joining its group's rounds."""
    return min(1.0, clients_per_round * groups / num_clients)


def participation(scheme: str, num_clients: int, clients_per_round: int, num_rounds: int,
                  groups: int | None = None) -> tuple[int, float]:
    """(rounds one client may join, its chance of joining each of them) over ``num_rounds``."""
    if scheme == "all":
        return num_rounds, 1.0
    if scheme == "cyclic":
        g = cyclic_groups(num_clients, clients_per_round, groups)
        return math.ceil(num_rounds / g), cyclic_rate(num_clients, clients_per_round, g)
    return num_rounds, min(1.0, clients_per_round / num_clients)


class ClientSampler:
    """Draws a round's cohort from ``population_size`` clients.

    ``seed=None`` seeds numpy's PCG64 with 128 bits from the operating system's CSPRNG, so nobody
    can predict who is sampled (what privacy amplification by sampling assumes). Such a
    generator's state is never exposed or saved (it would let anyone who reads the checkpoint
    rebuild past and future cohorts): a resumed run reseeds from the OS. A seeded sampler
    (non-private or ``privacy.secure_rng=false`` runs) saves its state, so that a resumed research
    run samples as the uninterrupted one would.
    """

    def __init__(self, scheme: str, population_size: int, expected_size: int, seed: int | None,
                 groups: int | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown sampling scheme {scheme!r}")
        self.scheme = scheme
        self.population_size = population_size
        self.expected_size = min(expected_size, population_size)
        self.groups = cyclic_groups(population_size, self.expected_size, groups) if scheme == "cyclic" else 1
        if not 1 <= self.groups <= population_size:
            raise ValueError(f"cyclic groups must be in [1, {population_size}], got {self.groups}")
        self.seeded = seed is not None
        self.rng = np.random.default_rng(seed)

    @property
    def rate(self) -> float:
        """Each client's chance of taking part in a round (in its group's rounds, under ``cyclic``)."""
        if self.scheme == "cyclic":
            return cyclic_rate(self.population_size, self.expected_size, self.groups)
        return 1.0 if self.scheme == "all" else self.expected_size / self.population_size

    def sample(self, server_round: int | None = None) -> np.ndarray:
        """The cohort of a round (``server_round``, 1-based, is needed only by ``cyclic``)."""
        n = self.population_size
        if self.scheme == "all":
            return np.arange(n)
        if self.scheme == "fixed":
            return np.sort(self.rng.choice(n, size=self.expected_size, replace=False))
        if self.scheme == "cyclic":
            if server_round is None or server_round < 1:
                raise ValueError("cyclic sampling needs the round number (1-based)")
            group = (server_round - 1) % self.groups
            members = (n - group + self.groups - 1) // self.groups  # clients group, group + G, ... below n
            return group + self.groups * self._poisson(members, self.rate)
        return self._poisson(n, self.rate)

    def _poisson(self, n: int, q: float) -> np.ndarray:
        """Each of ``n`` clients independently with probability ``q``, in O(cohort) time and memory.

        The gaps between successive members of a Bernoulli(q) sequence are i.i.d. Geometric(q)
        (support 1, 2, ...), so drawing the gaps gives exactly the law of ``random(n) < q`` without
        touching the clients left out: a 1,000,000-client population costs what its cohort costs.
        numpy has no sampler of a Bernoulli process's members; this is the textbook construction.
        """
        if q >= 1.0:
            return np.arange(n)
        if q <= 0.0:
            return np.zeros(0, dtype=np.int64)
        parts, last = [], -1
        batch = int(n * q + 6 * np.sqrt(n * q)) + 16  # almost always one batch of gaps suffices
        while True:
            members = last + np.cumsum(self.rng.geometric(q, size=batch))
            if members[-1] >= n:
                parts.append(members[members < n])
                return np.concatenate(parts)
            parts.append(members)
            last = int(members[-1])

    def state_dict(self) -> dict[str, Any]:
        """The generator's state only for a seeded sampler; nothing for an unpredictable one."""
        return {"bit_generator": self.rng.bit_generator.state if self.seeded else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.seeded and state.get("bit_generator") is not None:
            self.rng.bit_generator.state = state["bit_generator"]
