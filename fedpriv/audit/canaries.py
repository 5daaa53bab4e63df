"""Canary clients for the user-level audit of central DP (Andrew et al., ICLR 2024).

How canaries enter a run (``audit.enabled``; see :class:`CanaryAudit`):

* ``audit.canaries`` = ``m`` random directions ``u_1..u_m``, uniform on the unit sphere of the
  model's parameter space (all float arrays flattened in the model's key order). Each is
  *inserted* into the population with probability 1/2, independently (the randomisation Steinke
  et al. need); the others are *held out*: never inserted, they give the null distribution.
* An inserted canary is one more client of the population: every round it joins with the
  sampling rate the accountant assumes for real clients (Poisson: probability ``q``; ``all``:
  always; ``fixed``: probability ``q = sample_size / population`` independently, the right
  per-client inclusion law, without the without-replacement coupling between clients). Its update
  is ``C * u_i`` (``C`` the round's clip norm, so clipping leaves it unchanged) and it is added to
  the clipped sum *before* the noise, like any client's.
* The population is ``num_clients + k`` (``k`` inserted canaries): the sum is divided by
  ``E[m] = plan.denominator + q k``. The noise on the sum is still ``z C``, so the real clients'
  guarantee is unchanged (the canaries' sum does not depend on any client's data).
* The released model *includes* the canaries' contributions (as in the paper): the run says so in
  privacy.json and summary.json (``audit_model_includes_canaries``). Do not ship an audited model;
  audit a configuration with ``scripts/audit.py`` and train the shipped model in a separate run.

After every round the released noised average ``Delta_t`` is buffered (float32, bounded memory);
in batches the auditor computes ``cos(u_i, Delta_t)`` for every canary and keeps the running
maximum over rounds (threat model *all rounds*). At the end, ``cos(u_i, final model - initial
model)`` gives the *final model* statistic. Directions are regenerated from ``(seed, i)`` when they
do not fit in memory, so the audit costs a few passes over ``m x d`` random numbers.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

DEFAULT_CACHE_BYTES = 256 * 2**20  # keep the m x d directions in memory below this size
_BLOCK_BYTES = 32 * 2**20  # rows generated at once when they are not kept
_BUFFER_BYTES = 64 * 2**20  # released aggregates kept before their cosines are computed


class CanaryDirections:
    """``count`` unit vectors of R^dim, uniform on the sphere; vector ``i`` is a function of ``(seed, i)``."""

    def __init__(self, count: int, dim: int, seed: int, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.count, self.dim, self.seed = int(count), int(dim), int(seed)
        self._cache: np.ndarray | None = None
        if self.count * self.dim * 4 <= cache_bytes:
            self._cache = np.stack([self._make(i) for i in range(self.count)]) if self.count else np.zeros((0, dim), np.float32)

    def _make(self, i: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, int(i)]))
        x = rng.standard_normal(self.dim, dtype=np.float32)
        x /= np.float32(math.sqrt(float(np.dot(x, x))))
        return x

    def rows(self, idx: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, their directions as rows) in blocks of bounded memory."""
        idx = np.asarray(idx, dtype=np.int64)
        step = max(1, _BLOCK_BYTES // (4 * self.dim))
        for s in range(0, idx.size, step):
            block = idx[s : s + step]
            if self._cache is not None:
                yield block, self._cache[block]
            else:
                yield block, np.stack([self._make(i) for i in block])

    def dots(self, columns: np.ndarray) -> np.ndarray:
        """``<u_i, column_j>`` for every direction ``i`` and column ``j`` of a (dim, n) matrix.

        Single-precision products (BLAS): the rounding error, about 1e-6 * ||column|| (blocked
        summation), stays below 1e-3 of the null cosine's std ||column|| / sqrt(d) up to d ~ 10^6.
        """
        cols = np.ascontiguousarray(np.asarray(columns, dtype=np.float32).reshape(self.dim, -1))
        out = np.zeros((self.count, cols.shape[1]))
        for block, mat in self.rows(np.arange(self.count)):
            out[block] = mat @ cols
        return out

    def combination(self, idx: np.ndarray) -> np.ndarray:
        """``sum_{i in idx} u_i`` in float64."""
        total = np.zeros(self.dim)
        for _, mat in self.rows(np.asarray(idx)):
            total += mat.sum(axis=0, dtype=np.float64)
        return total


class CanaryAudit:
    """The canary clients of one run and the auditor's statistics (driven by the central-DP aggregator).

    Args:
        count: canary directions ``m`` (inserted with probability 1/2 each, the rest held out).
        sampling / sampling_rate: the real clients' sampling (what the accountant assumes).
        seed: directions, inclusion bits and canary participation.
        noise_scale: scale of the noise actually drawn (1 for a real audit; recorded for the report).
        plan: the run's :class:`~fedpriv.privacy.plan.NoisePlan` (delta, accountant, for the report).
    """

    def __init__(
        self,
        count: int,
        sampling: str,
        sampling_rate: float,
        seed: int,
        *,
        confidence: float = 0.95,
        noise_scale: float = 1.0,
        plan: Any = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.count = int(count)
        self.sampling = sampling
        self.q = 1.0 if sampling == "all" else float(sampling_rate)
        self.seed = int(seed)
        self.confidence = float(confidence)
        self.noise_scale = float(noise_scale)
        self.plan = plan
        # sampling=cyclic: canary i belongs to group i mod G, as client i does, and joins only its group's rounds
        self.cycle = int(getattr(plan, "cycle", 1) or 1) if sampling == "cyclic" else 1
        self.cache_bytes = cache_bytes
        self.inserted = np.random.default_rng([self.seed, 1]).random(self.count) < 0.5
        self._rng = np.random.default_rng([self.seed, 2])  # who of the inserted canaries joins a round
        self.directions: CanaryDirections | None = None
        self.layout: list[tuple[str, tuple[int, ...]]] | None = None
        self.participations = np.zeros(self.count, dtype=np.int64)
        self.max_cos = np.full(self.count, -np.inf)
        self.rounds = 0
        self.per_round: list[dict[str, float]] = []  # canaries in the round, noise multiplier drawn
        self._buffer: list[np.ndarray] = []
        self._buffer_norms: list[float] = []
        self._initial: np.ndarray | None = None
        self._final_delta: np.ndarray | None = None

    @classmethod
    def from_config(cls, rc: Any, plan: Any) -> "CanaryAudit":
        a = rc.audit
        seed = a.seed if a.seed is not None else rc.seed + 7_777_777
        return cls(
            a.canaries, plan.sampling, plan.sampling_rate, seed,
            confidence=a.confidence, noise_scale=a.noise_scale, plan=plan,
        )

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_inserted(self) -> int:
        return int(self.inserted.sum())

    @property
    def expected_per_round(self) -> float:
        """Expected canaries in a round's cohort (added to the denominator E[m])."""
        return self.q * self.num_inserted / self.cycle

    @property
    def dim(self) -> int | None:
        return None if self.layout is None else int(sum(int(np.prod(s)) for _, s in self.layout))

    # -- flattening ------------------------------------------------------------------------------
    def _set_layout(self, arrays: dict[str, np.ndarray]) -> None:
        layout = [(k, tuple(v.shape)) for k, v in arrays.items()]
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError("canary audit: the model's arrays changed between rounds")
        if self.directions is None:
            self.directions = CanaryDirections(self.count, self.dim or 0, self.seed, self.cache_bytes)

    def flatten(self, arrays: Any) -> np.ndarray:
        if not isinstance(arrays, dict):  # a Flower ArrayRecord
            arrays = {k: v.numpy() for k, v in arrays.items()}
        assert self.layout is not None
        return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k, _ in self.layout])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        assert self.layout is not None
        out, at = {}, 0
        for k, shape in self.layout:
            n = int(np.prod(shape))
            out[k] = flat[at : at + n].reshape(shape)
            at += n
        return out

    # -- the round ---------------------------------------------------------------------------------
    def add_canaries(self, server_round: int, total: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], int]:
        """Add this round's sampled inserted canaries (``clip_norm * u_i`` each) to the clipped sum."""
        self._set_layout(total)
        assert self.directions is not None
        ins = np.flatnonzero(self.inserted)
        if self.sampling == "cyclic":
            ins = ins[ins % self.cycle == (server_round - 1) % self.cycle]
        joined = ins if self.sampling == "all" or self.q >= 1 else ins[self._rng.random(ins.size) < self.q]
        self.participations[joined] += 1
        if joined.size == 0:
            return total, 0
        extra = self.unflatten(self.directions.combination(joined) * clip_norm)
        return {k: total[k] + extra[k] for k in total}, int(joined.size)

    def observe_round(
        self,
        server_round: int,
        noised_mean: dict[str, np.ndarray],
        global_before: dict[str, np.ndarray],
        global_after: Any,
        *,
        canaries_in: int,
        noise_multiplier_drawn: float,
        count_stddev: float = 0.0,
    ) -> None:
        """Record the round's release (the noised average) and the model after it."""
        self._set_layout(global_before)
        if self._initial is None:
            self._initial = self.flatten(global_before)
        self._final_delta = self.flatten(global_after) - self._initial
        agg = self.flatten(noised_mean)
        self._buffer.append(agg.astype(np.float32))
        self._buffer_norms.append(float(np.linalg.norm(agg)))
        self.rounds += 1
        self.per_round.append(
            {"round": server_round, "canaries": canaries_in, "z_drawn": float(noise_multiplier_drawn), "count_stddev": float(count_stddev)}
        )
        if len(self._buffer) * (self.dim or 1) * 4 >= _BUFFER_BYTES:
            self.flush()

    def flush(self, extra: np.ndarray | None = None) -> np.ndarray | None:
        """Cosines of every canary with the buffered releases (running max); with ``extra`` (a
        vector), also returns every canary's cosine with it, in the same pass over the directions."""
        cols = [b.astype(np.float64) for b in self._buffer]
        norms = list(self._buffer_norms)
        if extra is not None:
            cols.append(np.asarray(extra, dtype=np.float64))
            norms.append(float(np.linalg.norm(extra)))
        if not cols or self.directions is None:
            return None
        dots = self.directions.dots(np.stack(cols, axis=1))
        n = np.asarray(norms)
        cos = np.divide(dots, n, out=np.zeros_like(dots), where=n > 0)
        nb = len(self._buffer)
        if nb:
            self.max_cos = np.maximum(self.max_cos, cos[:, :nb].max(axis=1))
        self._buffer, self._buffer_norms = [], []
        return cos[:, nb] if extra is not None else None

    def statistics(self) -> dict[str, np.ndarray]:
        """Per canary: ``final_model`` cosine and ``all_rounds`` max cosine (flushes the buffer)."""
        if self._final_delta is None:
            return {"final_model": np.zeros(0), "all_rounds": np.zeros(0)}
        final = self.flush(extra=self._final_delta)
        assert final is not None
        return {"final_model": final, "all_rounds": self.max_cos.copy()}

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seed": self.seed,
            "inserted": self.inserted.copy(),
            "rng": self._rng.bit_generator.state,
            "layout": self.layout,
            "participations": self.participations.copy(),
            "max_cos": self.max_cos.copy(),
            "rounds": self.rounds,
            "per_round": list(self.per_round),
            "buffer": list(self._buffer),
            "buffer_norms": list(self._buffer_norms),
            "initial": self._initial,
            "final_delta": self._final_delta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["count"]) != self.count or int(state["seed"]) != self.seed:
            raise ValueError("canary audit: the checkpoint's canaries differ from this run's")
        self.inserted = np.asarray(state["inserted"], dtype=bool)
        self._rng.bit_generator.state = state["rng"]
        self.layout = [(k, tuple(s)) for k, s in state["layout"]] if state["layout"] is not None else None
        self.directions = None
        if self.layout is not None:
            self.directions = CanaryDirections(self.count, self.dim or 0, self.seed, self.cache_bytes)
        self.participations = np.asarray(state["participations"]).copy()
        self.max_cos = np.asarray(state["max_cos"], dtype=np.float64).copy()
        self.rounds = int(state["rounds"])
        self.per_round = list(state["per_round"])
        self._buffer = list(state["buffer"])
        self._buffer_norms = list(state["buffer_norms"])
        self._initial = state["initial"]
        self._final_delta = state["final_delta"]

    # -- what the noise really was ----------------------------------------------------------------
    def effective_multipliers(self) -> list[float]:
        """Total noise multiplier of each round as drawn (update noise, and the clipped-count noise
        under adaptive clipping composed as the ledger does)."""
        out = []
        for r in self.per_round:
            z, sb = r["z_drawn"], r["count_stddev"]
            if sb > 0:
                z = 0.0 if z == 0 else (z**-2 + (2 * sb) ** -2) ** -0.5
            out.append(z)
        return out
