"""Which clients take part in a round. The scheme must be the one the privacy accountant assumes.

- ``poisson``: each client joins independently with probability q (amplification by Poisson sampling),
  drawn in O(cohort), not O(population), time and memory;
- ``fixed``: exactly ``expected_size`` clients, uniformly without replacement;
- ``all``: every client every round (no amplification).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ClientSampler:
    """Draws a round's cohort from ``population_size`` clients.

    ``seed=None`` seeds numpy's PCG64 with 128 bits from the operating system's CSPRNG, so nobody
    can predict who is sampled (what privacy amplification by sampling assumes). Such a
    generator's state is never exposed or saved (it would let anyone who reads the checkpoint
    rebuild past and future cohorts): a resumed run reseeds from the OS. A seeded sampler
    (non-private or ``privacy.secure_rng=false`` runs) saves its state, so that a resumed research
    run samples as the uninterrupted one would.
    """

    def __init__(self, scheme: str, population_size: int, expected_size: int, seed: int | None):
        if scheme not in ("poisson", "fixed", "all"):
            raise ValueError(f"unknown sampling scheme {scheme!r}")
        self.scheme = scheme
        self.population_size = population_size
        self.expected_size = min(expected_size, population_size)
        self.seeded = seed is not None
        self.rng = np.random.default_rng(seed)

    @property
    def rate(self) -> float:
        """Each client's chance of taking part in a round."""
        return 1.0 if self.scheme == "all" else self.expected_size / self.population_size

    def sample(self) -> np.ndarray:
        n = self.population_size
        if self.scheme == "all":
            return np.arange(n)
        if self.scheme == "fixed":
            return np.sort(self.rng.choice(n, size=self.expected_size, replace=False))
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
