"""Central (user-level) differential privacy: DP-FedAvg's Gaussian mechanism, with no Flower in it.

DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et al. 2021), in the spirit
of TensorFlow Federated's DPQuery and pfl-research's mechanisms:

1. each sampled client's update (its model minus the global model) is clipped to L2 norm ``C``;
2. the clipped updates are summed *unweighted* and Gaussian noise of std ``z * C`` is added;
3. the sum is divided by the *expected* cohort size ``E[m]`` (not the number that replied), so
   one client changes the estimate by at most ``C / E[m]`` whoever drops out.

Each round is one release recorded in a :class:`~fedpriv.privacy.PrivacyLedger` with the sampling
the round really used. Under adaptive clipping the noisy count of unclipped updates is a second
Gaussian release; the two compose into one Gaussian of total multiplier ``z`` (what the ledger
records), the update getting ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``. The norm a round clips
with is the norm its noise is calibrated with; the new norm only applies from the next round.

An audit enters through a declared :class:`ReleaseHook` (canary updates join the clipped sum
before the noise; the hook sees every release). A hook may scale the noise actually drawn
(``noise_scale``): only an audit of a deliberately broken run does, and the report says so.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedpriv import updates
from fedpriv.updates import Arrays

from .correlated import make_noise
from .ledger import PrivacyLedger
from .noise import update_noise_for_total
from .noise_samplers import GaussianSampler, make_gaussian_sampler
from .plan import NoisePlan, plan_epsilons


@dataclass
class ClippingState:
    """The clip norm and what adaptive clipping needs to move it."""

    norm: float
    adaptive: bool
    target_unclipped_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 0.0  # sigma_b: std of the noise on the (centred) count of unclipped updates

    def update(self, noisy_unclipped_fraction: float) -> None:
        """Geometric step toward the target quantile: more clipped than wanted -> the norm grows."""
        if self.adaptive:
            self.norm *= math.exp(-self.learning_rate * (noisy_unclipped_fraction - self.target_unclipped_quantile))


class ReleaseHook(Protocol):
    """What an audit may do to a release: add its canaries to the clipped sum before the noise,
    and observe every release. ``noise_scale`` is 1 except in a deliberately broken audit run."""

    noise_scale: float

    @property
    def expected_per_round(self) -> float: ...

    def add_canaries(self, server_round: int, total: Arrays, clip_norm: float) -> tuple[Arrays, int]: ...

    def observe_round(self, server_round: int, noised_mean: Arrays, global_arrays: Arrays, new_model: Any, *,
                      canaries_in: int, noise_multiplier_drawn: float, count_stddev: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Release:
    """One round's release and what the report of the round needs."""

    noised_mean: Arrays  # the noised sum / E[m]: the only thing derived from clients that leaves
    clip_norm: float
    noise_std_sum: float
    canaries_in: int
    metrics: dict[str, Any] = field(default_factory=dict)


class CentralGaussianMechanism:
    """Clip, sum, noise, divide by E[m]; adaptive clipping; the run's ledger and budget.

    Args (privacy meaning):
        plan: per-round noise multipliers, sampling scheme and rate the accountant assumes, delta,
            budget, and the expected cohort the noised sum is divided by.
        clipping: the per-client L2 bound (the sensitivity of one user's contribution).
        noise_sampler: ``numpy`` or ``opendp`` (:mod:`fedpriv.privacy.noise_samplers`).
        secure_rng: draw the noise unpredictably (for release); ``False`` seeds numpy from
            ``seed`` and the round (reproducible research runs, NOT for release). No generator
            state is ever saved.
        hook: an audit's :class:`ReleaseHook`, or None.
    """

    def __init__(self, plan: NoisePlan, clipping: ClippingState, *, noise_sampler: str = "numpy",
                 secure_rng: bool = True, seed: int = 0, hook: ReleaseHook | None = None):
        self.plan = plan
        self.clipping = clipping
        self.noise_sampler = noise_sampler
        self.secure_rng = secure_rng
        self.hook = hook
        self.ledger = PrivacyLedger()
        self.noise_scale = hook.noise_scale if hook is not None else 1.0  # noise drawn / planned (audits only)
        self._seed = seed
        self._sampler = make_gaussian_sampler(noise_sampler) if secure_rng else None
        self._planned = plan_epsilons(plan)
        self._round_clip_norm: float | None = None
        # tree / bandmf: the noise stream correlated across rounds (None: independent noise each round)
        self.noise_stream = make_noise(plan.mechanism, bands=plan.bands, epoch=plan.cycle)
        self.rounds = 0  # rounds released so far
        self._prefetch: threading.Thread | None = None  # prefetch_epsilons' thread

    # -- before a round ---------------------------------------------------------------------------
    def noise_multiplier(self, server_round: int) -> float:
        """The total noise multiplier of round ``server_round`` (what the ledger records)."""
        return self.plan.noise_multipliers[server_round - 1]

    def _budget_trial(self, ledger: PrivacyLedger, server_round: int) -> tuple[PrivacyLedger, PrivacyLedger | None]:
        """``ledger`` with round ``server_round`` recorded (a copy), and the run's other releases if it
        stopped after that round (analytics, selection) or None."""
        trial = ledger.copy()
        self.plan.record_round(trial, self.noise_multiplier(server_round), server_round)
        others = self.plan.reserved(server_round) if self.plan.reserved is not None else None
        return trial, others

    def prefetch_epsilons(self, server_round: int) -> None:
        """While round ``server_round`` trains, compute on a thread the epsilons the server will ask for
        next: the ledger's once this round is recorded (the round's published figure) and, under a
        budget, the trial of the next round (its :meth:`stop_reason`). The accountant caches each by the
        exact events (:func:`fedpriv.privacy.accounting.epsilon`), so the later call returns the value it
        would have computed itself; a guess that does not match what is recorded is only a cache entry
        nobody reads. No privacy meaning: nothing is released or recorded here."""
        self.await_prefetch()
        if server_round > len(self.plan.noise_multipliers):
            return
        after, _ = self._budget_trial(self.ledger, server_round)
        jobs = [after]
        if self.plan.target_epsilon is not None and server_round < len(self.plan.noise_multipliers):
            trial, others = self._budget_trial(after, server_round + 1)
            if others is not None:
                trial.extend(others)
            jobs.append(trial)
        delta, accountant = self.plan.delta, self.plan.accountant

        def compute() -> None:
            for ledger in jobs:
                with contextlib.suppress(Exception):  # the server's own call raises it, if it is real
                    ledger.epsilon(delta, accountant)

        self._prefetch = threading.Thread(target=compute, name="fedpriv-epsilon-prefetch", daemon=True)
        self._prefetch.start()

    def await_prefetch(self) -> None:
        """Wait for :meth:`prefetch_epsilons`' thread (a value being computed is not computed twice)."""
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None

    def stop_reason(self, server_round: int) -> str | None:
        """Why round ``server_round`` must not happen (the plan ends, or the budget), else None."""
        if server_round > len(self.plan.noise_multipliers):
            return f"the privacy plan covers {len(self.plan.noise_multipliers)} rounds"
        if self.plan.target_epsilon is not None:
            self.await_prefetch()
            # what the run releases besides training if it stops after this round (analytics, selection)
            trial, others = self._budget_trial(self.ledger, server_round)
            if others is not None:
                trial.extend(others)
            eps = trial.epsilon(self.plan.delta, self.plan.accountant)
            if eps > self.plan.target_epsilon * (1 + 1e-9):
                also = " (with the run's analytics / selection releases)" if others and others.num_releases else ""
                return (f"privacy budget: round {server_round} would bring epsilon to {eps:.3f}{also} > target "
                        f"{self.plan.target_epsilon}")
        return None

    def start_round(self) -> float:
        """Fix the round's clip norm (the one its noise is calibrated with) and return it."""
        self._round_clip_norm = self.clipping.norm
        return self._round_clip_norm

    def _noise_source(self, server_round: int) -> GaussianSampler:
        """The run's unpredictable sampler; a seeded run draws each round from (seed, round), so
        that a resumed research run reproduces the uninterrupted one without saving any state."""
        if self._sampler is not None:
            return self._sampler
        return make_gaussian_sampler("numpy", (self._seed + 104_729) * 1_000_003 + server_round)

    # -- the release ------------------------------------------------------------------------------
    @property
    def round_clip_norm(self) -> float:
        """The clip norm of the current round (fixed by :meth:`start_round`)."""
        return self._round_clip_norm if self._round_clip_norm is not None else self.clipping.norm

    def clip_and_sum(self, client_updates: list[Arrays], global_arrays: Arrays,
                     reported_unclipped: list[float | None] | None = None) -> tuple[Arrays, list[float], list[float]]:
        """Clip each update to the round's norm and sum them: (sum, unclipped bits, raw norms).

        ``reported_unclipped``: per client, the unclipped bit it reported (client clipping), or
        None to use the server's own check.
        """
        clip_norm = self.round_clip_norm
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_arrays.items()}
        norms, bits = [], []
        for i, delta in enumerate(client_updates):
            clipped, norm, was_clipped = updates.clip(delta, clip_norm)
            total = updates.add(total, clipped)
            norms.append(norm)
            reported = reported_unclipped[i] if reported_unclipped is not None else None
            bits.append(float(reported) if reported is not None else (0.0 if was_clipped else 1.0))
        return total, bits, norms

    def release(self, server_round: int, client_updates: list[Arrays], global_arrays: Arrays,
                reported_unclipped: list[float | None] | None = None) -> Release:
        """Clip, sum, noise and average this round's raw updates (see :meth:`release_sum`)."""
        total, bits, norms = self.clip_and_sum(client_updates, global_arrays, reported_unclipped)
        return self.release_sum(server_round, total, bits, norms, global_arrays)

    def release_sum(self, server_round: int, total: Arrays, bits: list[float], norms: list[float],
                    global_arrays: Arrays) -> Release:
        """Noise and average a sum of updates each clipped to the round's norm; record the release.

        Args:
            total: the sum of the round's clipped updates (one per client that replied).
            bits: each of those clients' unclipped bit (adaptive clipping's count).
            norms: their raw norms (an operator-only diagnostic).
        """
        updates.check_float_arrays(global_arrays)
        clip_norm = self.round_clip_norm
        z_total = self.noise_multiplier(server_round)
        adaptive_noise = self.clipping.adaptive and z_total > 0
        z_update = update_noise_for_total(z_total, self.clipping.count_stddev) if adaptive_noise else z_total
        total = {k: np.asarray(v, dtype=np.float64) for k, v in total.items()}

        canaries_in = 0
        if self.hook is not None:  # inserted canaries sampled this round join the clipped sum, before the noise
            total, canaries_in = self.hook.add_canaries(server_round, total, clip_norm)
        denom = self.plan.denominator + (self.hook.expected_per_round if self.hook is not None else 0.0)
        noise_std_sum = z_update * clip_norm * self.noise_scale
        # the std of the noise this round's average really carries (correlated: its marginal, not the draws')
        round_std = noise_std_sum * (self.noise_stream.marginal_std(server_round) if self.noise_stream is not None else 1.0)
        signal_norm = updates.l2_norm(total) / denom
        sampler = self._noise_source(server_round)
        if self.noise_stream is None:
            noised_mean = {k: sampler.add_noise(v, noise_std_sum) / denom for k, v in total.items()}
        else:  # this round's share of the correlated noise, built from fresh draws of std z * C
            noise = self.noise_stream.next(server_round, lambda: {
                k: sampler.add_noise(np.zeros(v.shape, dtype=np.float64), noise_std_sum) for k, v in total.items()})
            noised_mean = {k: (v + noise[k]) / denom for k, v in total.items()}

        noisy_unclipped = None
        if self.clipping.adaptive:
            # Andrew et al. 2021: each bit is centred at 1/2 (sensitivity 1/2), noised, and
            # uncentred with the public E[m]; the reply count itself is never used.
            centred_sum = np.array([float(np.sum(np.asarray(bits) - 0.5))])
            centred = float(sampler.add_noise(centred_sum, self.clipping.count_stddev)[0])
            noisy_unclipped = centred / denom + 0.5
        self.await_prefetch()
        self.plan.record_round(self.ledger, z_total, server_round)
        self.rounds = server_round
        if noisy_unclipped is not None:
            self.clipping.update(noisy_unclipped)

        d = updates.num_parameters(global_arrays)
        q = np.quantile(norms, [0.1, 0.5, 0.9]) if norms else [math.nan] * 3
        raw_clipped = 1.0 - sum(bits) / len(bits) if bits else math.nan
        metrics: dict[str, Any] = {
            "epsilon": self.ledger.epsilon(self.plan.delta, self.plan.accountant),
            "planned_epsilon": self._planned[server_round - 1] if self._planned else math.nan,
            "delta": self.plan.delta,
            "noise_multiplier": z_total,
            "update_noise_multiplier": z_update,
            "clip_norm": clip_norm,
            "clipped_fraction": (1.0 - noisy_unclipped) if noisy_unclipped is not None else raw_clipped,
            "noise_std": round_std / denom,
            "snr": signal_norm / (round_std / denom * math.sqrt(d)) if noise_std_sum > 0 else math.inf,
            "update_norm_p10": float(q[0]),
            "update_norm_p50": float(q[1]),
            "update_norm_p90": float(q[2]),
            "cohort_size": len(bits),
        }
        if self.hook is not None:
            metrics["audit_canaries_in_round"] = canaries_in
        return Release(noised_mean, clip_norm, noise_std_sum, canaries_in, metrics)

    def after_update(self, server_round: int, release: Release, global_arrays: Arrays, new_model: Any) -> None:
        """Let the hook see the release and the model the strategy made of it."""
        if self.hook is not None:
            self.hook.observe_round(
                server_round, release.noised_mean, global_arrays, new_model, canaries_in=release.canaries_in,
                noise_multiplier_drawn=release.noise_std_sum / release.clip_norm,
                count_stddev=self.clipping.count_stddev if self.clipping.adaptive else 0.0,
            )

    def covered_metric_keys(self) -> tuple[str, ...]:
        """Round metrics covered by the guarantee: the plan's figures and, under adaptive clipping,
        the clipped fraction, which comes from the noised count. The raw ones (update-norm
        quantiles, snr, cohort size, the clipped fraction under fixed clipping) are operator-only."""
        keys = ("epsilon", "planned_epsilon", "delta", "noise_multiplier", "update_noise_multiplier", "clip_norm",
                "noise_std")
        return keys + (("clipped_fraction",) if self.clipping.adaptive else ())

    # -- persistence and reporting ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs. Under tree / bandmf it holds the correlated noise already drawn, which
        would let a reader remove the noise from released updates: it goes only into the operator's
        checkpoint, and not into that of a run that cannot go on (its plan or its budget ends)."""
        finished = self.noise_stream is not None and self.finished  # (only a noise stream needs to know)
        return {
            "ledger": self.ledger.state_dict(),
            "clip_norm": self.clipping.norm,
            "audit": self.hook.state_dict() if self.hook is not None else None,
            "rounds": self.rounds,
            "noise_stream": None if self.noise_stream is None or finished else self.noise_stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"])
        self.clipping.norm = float(state["clip_norm"])
        self.rounds = int(state.get("rounds", self.ledger.num_releases))
        if self.noise_stream is not None and self.rounds and not self.finished:
            if state.get("noise_stream") is None:
                raise ValueError(f"the checkpoint after round {self.rounds} holds no correlated noise state "
                                 f"({self.plan.mechanism}): the run cannot continue its noise")
            self.noise_stream.load_state_dict(state["noise_stream"])
        if self.hook is not None and state.get("audit") is not None:
            self.hook.load_state_dict(state["audit"])

    @property
    def finished(self) -> bool:
        """No round can follow: the plan or the budget ends (what the next round's stop would say)."""
        return self.rounds >= len(self.plan.noise_multipliers) or self.stop_reason(self.rounds + 1) is not None

    def report(self, clip_on: str) -> dict[str, Any]:
        """privacy.json's central part: the guarantee, the figures, the events, the randomness."""
        report = self.plan.report(self.ledger, rounds=self.rounds, clipping=self.clipping, clip_on=clip_on,
                                  secure_rng=self.secure_rng)
        if self.noise_stream is not None:
            report["caveats"].append(
                f"{self.plan.mechanism}: the noise is correlated across rounds; while the run is unfinished, checkpoint.pt "
                "(operator-only) holds the noise already drawn, which removes the noise from released updates: keep it "
                "as secret as the clients' data (the checkpoint of a run whose plan or budget has ended drops it)")
            if self.hook is not None:
                report["caveats"].append(
                    f"audit under {self.plan.mechanism}: the canary statistic (each round's cosine) ignores the noise's "
                    "correlation across rounds: a weaker attack than one that decorrelates it; the empirical lower bound "
                    "stays valid, it is only looser")
        report["randomness"] = randomness_words(self.noise_sampler, self.secure_rng)
        if self.noise_sampler == "opendp":
            report["caveats"].append(
                "noise_sampler=opendp rounds each noised value to a grid of 2^k with k = floor(log2 std) - 52; "
                "OpenDP's own privacy map charges this as a relative increase of rho below 1e-12 for these model "
                "sizes, far below the accountant's own discretisation, and the ledger does not add it"
            )
        return report


def randomness_words(noise_sampler: str, secure_rng: bool) -> dict[str, str]:
    """Where every random choice of a central-DP run comes from, for privacy.json."""
    if not secure_rng:
        noise = ("numpy Generator.normal (float Gaussian) on PCG64 seeded from the run's seed and the round: "
                 "reproducible, NOT for release")
    elif noise_sampler == "opendp":
        noise = ("OpenDP's vector Gaussian mechanism (make_gaussian): every value rounded exactly to a grid of 2^k, "
                 "exact discrete Gaussian noise on that grid (Canonne, Kamath & Steinke 2020) added in exact "
                 "arithmetic, rounded once to float64; random bits from OpenSSL's CSPRNG; floating-point safe")
    else:
        noise = ("numpy Generator.normal (256-level ziggurat in float64) on PCG64 seeded with 128 bits from the OS "
                 "CSPRNG (Python's secrets); PCG64 is not a CSPRNG and float Gaussian sampling is open to "
                 "floating-point attacks (Mironov 2012): use privacy.noise_sampler=opendp for a release")
    sampling = ("numpy PCG64 seeded from the run's seed: reproducible, NOT for release" if not secure_rng else
                "numpy PCG64 seeded with 128 bits from the OS CSPRNG; its state is never saved, a resumed run "
                "reseeds from the OS, so no file lets anyone rebuild past or future cohorts")
    return {"noise": noise, "client_sampling": sampling}
