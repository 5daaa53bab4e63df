"""Noise correlated across rounds: DP-FTRL's tree aggregation and banded matrix factorization.

Both mechanisms release, each round ``t``, the round's sum of clipped updates plus a noise ``w_t``
that is correlated across rounds, so that the noise on the *running sum* of updates (what the model
is built from) grows like ``log t`` (tree) or stays flat (banded factorization) instead of ``sqrt(t)``.
In matrix form, with ``x`` the rounds' sums and ``z`` i.i.d. Gaussian of std ``sigma * clip_norm``:

* banded matrix factorization (BandMF; Choquette-Choo et al. 2023, "(Amplified) Banded Matrix
  Factorization"): the rounds release ``x + C^-1 z`` for a lower-triangular ``b``-banded Toeplitz
  strategy matrix ``C``, i.e. the post-processing of ``C x + z``. One participation moves ``C x`` by
  at most ``clip_norm`` times a column's norm; the columns are normalised to norm at most 1. Two
  participations at least ``b`` rounds apart touch disjoint rows, so ``k`` of them have sensitivity
  ``sqrt(k)``: the sampler guarantees the separation (``sampling=cyclic``). The coefficients are the
  banded square root of the prefix-sum matrix (``binom(2k, k) / 4^k``, truncated to ``b`` bands and
  normalised; Kalinin & Lampert 2024), closed form instead of an optimiser; ``b = 1`` is DP-FedAvg.
* tree aggregation (DP-FTRL; Kairouz et al. 2021): each dyadic interval of rounds (a node) gets its
  own noise; the noise on the running sum after ``r`` rounds is the sum of the nodes of ``r``'s
  binary decomposition, and ``w_r`` is the difference of consecutive running-sum noises. The tree
  restarts every ``epoch`` rounds, during which every client takes part at most once. After ``r``
  rounds of an epoch, one client's update is in at most ``floor(log2 r) + 1`` released nodes.

How each is accounted (which releases the ledger records, round by round) is
:mod:`fedpriv.privacy.plan`'s business; this module only generates the noise. No well-kept Python
library streams these noises for numpy arrays of a federated model (jax_privacy's are JAX, per
training step, and TensorFlow Privacy's tree queries are TensorFlow), hence this small module.

The generators hold the noise already drawn (the ``b - 1`` last ``w`` of BandMF, the open nodes of
the tree). That state removes the noise from released updates: it goes only into the operator's
checkpoint of an unfinished run (see :meth:`CorrelatedNoise.state_dict`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

Arrays = dict[str, np.ndarray]
Draw = Callable[[], Arrays]  # one fresh i.i.d. Gaussian draw z of the model's shape, std sigma * clip_norm

MECHANISMS = ("gaussian", "tree", "bandmf")


def banded_sqrt_coefficients(bands: int) -> np.ndarray:
    """The first ``bands`` coefficients of the square root of the prefix-sum matrix, scaled to unit norm.

    The lower-triangular all-ones matrix ``A`` (prefix sums) is ``S^2`` for the Toeplitz ``S`` whose
    k-th diagonal is ``binom(2k, k) / 4^k`` (the series of ``(1 - x)^(-1/2)``). Keeping ``bands``
    diagonals and scaling them to norm 1 makes every full column of ``C`` unit-norm (shorter columns,
    at the end, are shorter), so one participation has sensitivity at most ``clip_norm``. The
    coefficients are positive and decreasing, so (Enestrom-Kakeya) ``C^-1``'s recursion is stable.
    """
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    coefficients = np.ones(bands)
    for k in range(1, bands):
        coefficients[k] = coefficients[k - 1] * (2 * k - 1) / (2 * k)
    return coefficients / np.linalg.norm(coefficients)


class CorrelatedNoise:
    """A stream of per-round noises ``w_t`` (each a dict of arrays, the model's shape)."""

    kind = "none"

    def next(self, server_round: int, draw: Draw) -> Arrays:
        raise NotImplementedError

    def marginal_std(self, server_round: int) -> float:
        """Std of round ``server_round``'s noise ``w_t`` per coordinate, per unit of the draws' std."""
        raise NotImplementedError

    def _check_kind(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"correlated noise state of kind {state.get('kind')!r}, not {self.kind!r}")

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class BandedNoise(CorrelatedNoise):
    """``w = C^-1 z`` for the ``b``-banded lower-triangular Toeplitz ``C`` with ``coefficients``, streamed:
    ``w_t = (z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0`` (back substitution over the last ``b - 1`` noises)."""

    kind = "bandmf"

    def __init__(self, coefficients: np.ndarray):
        self.coefficients = np.asarray(coefficients, dtype=np.float64)
        if self.coefficients.ndim != 1 or self.coefficients.size < 1 or not self.coefficients[0] > 0:
            raise ValueError("BandedNoise needs a 1-D array of coefficients with a positive first one")
        self.history: list[Arrays] = []  # w_{t-1}, w_{t-2}, ... (at most b - 1)
        self.rounds = 0
        self._inverse: list[float] = []  # first column of C^-1 (its Toeplitz series), grown on demand

    def marginal_std(self, server_round: int) -> float:
        """The norm of row t of ``C^-1``: the square root of the sum of its first t series terms squared."""
        c = self.coefficients
        while len(self._inverse) < server_round:
            k = len(self._inverse)
            acc = (1.0 if k == 0 else 0.0) - sum(c[j] * self._inverse[k - j] for j in range(1, min(k, c.size - 1) + 1))
            self._inverse.append(acc / c[0])
        return float(np.sqrt(np.sum(np.square(self._inverse[:server_round]))))

    def next(self, server_round: int, draw: Draw) -> Arrays:
        if server_round != self.rounds + 1:
            raise ValueError(f"correlated noise: round {server_round} after round {self.rounds} (a round skipped "
                             "or repeated would break the noise's correlation)")
        z = draw()
        w = {}
        for key, value in z.items():
            acc = np.asarray(value, dtype=np.float64).copy()
            for j, past in enumerate(self.history, start=1):
                acc -= self.coefficients[j] * past[key]
            w[key] = acc / self.coefficients[0]
        self.history = ([w] + self.history)[: self.coefficients.size - 1]
        self.rounds = server_round
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rounds": self.rounds, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if len(state["history"]) > self.coefficients.size - 1:
            raise ValueError(f"correlated noise state holds {len(state['history'])} past noises for "
                             f"{self.coefficients.size} bands")
        self.rounds, self.history = int(state["rounds"]), list(state["history"])


class TreeNoise(CorrelatedNoise):
    """Online binary-tree noise, restarted every ``epoch`` rounds.

    At position ``r`` of an epoch (1-based), the running-sum noise is the sum of the nodes of
    ``r``'s binary decomposition. Going from ``r - 1`` to ``r`` closes the ``k`` lowest open nodes
    (``k`` = trailing zeros of ``r``) and opens one new node of level ``k`` with fresh noise, so
    ``w_r = new node - the closed ones``. At a restart the running-sum noise starts again from 0
    (the previous epochs' noise stays in the model, as in Kairouz et al.'s restarts).
    """

    kind = "tree"

    def __init__(self, epoch: int):
        if epoch < 1:
            raise ValueError(f"the tree's epoch must be >= 1 round, got {epoch}")
        self.epoch = int(epoch)
        self.open: list[Arrays] = []  # the noises of r's decomposition, highest level first
        self.rounds = 0

    def marginal_std(self, server_round: int) -> float:
        """``w_r`` is one fresh node minus the nodes it closes (trailing zeros of the position), all independent."""
        position = (server_round - 1) % self.epoch + 1
        return math.sqrt(1 + (position & -position).bit_length() - 1)

    def next(self, server_round: int, draw: Draw) -> Arrays:
        if server_round != self.rounds + 1:
            raise ValueError(f"correlated noise: round {server_round} after round {self.rounds} (a round skipped "
                             "or repeated would break the noise's correlation)")
        position = (server_round - 1) % self.epoch + 1
        if position == 1:
            self.open = []
        closing = (position & -position).bit_length() - 1  # trailing zeros of position
        closed = [self.open.pop() for _ in range(closing)]
        node = {k: np.asarray(v, dtype=np.float64) for k, v in draw().items()}
        self.open.append(node)
        self.rounds = server_round
        return {k: node[k] - sum((c[k] for c in closed), np.zeros_like(node[k])) for k in node}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rounds": self.rounds, "open": self.open, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if int(state.get("epoch", self.epoch)) != self.epoch:
            raise ValueError(f"correlated noise state of a tree restarted every {state['epoch']} rounds, not {self.epoch}")
        self.rounds, self.open = int(state["rounds"]), list(state["open"])


def tree_nodes_released(position: int) -> int:
    """Most released nodes holding one round's contribution after ``position`` rounds of an epoch:
    ``floor(log2 position) + 1`` (the first round's leaf and its ancestors closed so far)."""
    return 0 if position < 1 else int(math.floor(math.log2(position))) + 1


def make_noise(mechanism: str, *, bands: int, epoch: int) -> CorrelatedNoise | None:
    """The stream of ``mechanism`` (None for ``gaussian``: independent noise every round)."""
    if mechanism == "gaussian":
        return None
    if mechanism == "bandmf":
        return BandedNoise(banded_sqrt_coefficients(bands))
    if mechanism == "tree":
        return TreeNoise(epoch)
    raise ValueError(f"unknown mechanism {mechanism!r}; choose one of {MECHANISMS}")


def strategy_matrix(bands: int, rounds: int) -> np.ndarray:
    """The dense ``rounds x rounds`` BandMF strategy matrix ``C`` (tests, reports)."""
    c = banded_sqrt_coefficients(bands)
    matrix = np.zeros((rounds, rounds))
    for k, value in enumerate(c[:rounds]):
        matrix += np.diag(np.full(rounds - k, value), -k)
    return matrix


def running_sum_noise(mechanism: str, rounds: int, *, bands: int = 1, epoch: int = 1) -> np.ndarray:
    """Std of the noise on the running sum of released rounds after each round, per unit of ``z * clip_norm``
    (closed forms: ``sqrt(t)`` for independent noise; the row norms of ``A C^-1`` for BandMF; for the tree,
    the square root of the nodes in the running sums: every finished tree's final decomposition plus the
    current position's). What a model built from the running sum (FedAvg, FTRL) carries of the noise."""
    t = np.arange(1, rounds + 1)
    if mechanism == "gaussian":
        return np.sqrt(t.astype(float))
    if mechanism == "bandmf":
        prefix = np.tril(np.ones((rounds, rounds))) @ np.linalg.inv(strategy_matrix(bands, rounds))
        return np.linalg.norm(prefix, axis=1)
    if mechanism == "tree":
        finished = (t // epoch) * bin(epoch).count("1")
        return np.sqrt(finished + np.array([bin(int(r)).count("1") for r in t % epoch], dtype=float))
    raise ValueError(f"unknown mechanism {mechanism!r}; choose one of {MECHANISMS}")
