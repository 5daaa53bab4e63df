"""Central (user-level) differential privacy around any of Flower's aggregation strategies.

DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et al. 2021):

1. each sampled client's update (its model minus the global model) is clipped to L2 norm ``C``
   (by the server, or already by the client under ``clip_on=client``; the server clips again,
   which is a no-op for an honest client);
2. the clipped updates are summed *unweighted* and Gaussian noise of std ``z * C`` is added;
3. the sum is divided by the *expected* cohort size ``E[m]`` (not the number that replied), so
   one client changes the estimate by at most ``C / E[m]`` whoever drops out;
4. the noised average goes to the wrapped Flower strategy as a single update (FedAvg applies it,
   FedAvgM and FedAdam use it as their pseudo-gradient).

Each round is one release recorded in a :class:`~fedpriv.privacy.PrivacyLedger` with the sampling
the round really used. Under adaptive clipping the noisy count of unclipped updates is a second
Gaussian release; the two compose into one Gaussian of total multiplier ``z`` (what the ledger
records), the update getting ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``. The norm a round clips
with is the norm its noise is calibrated with; the new norm only applies from the next round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedpriv import updates
from fedpriv.config import RunConfig
from fedpriv.privacy import PrivacyLedger, update_noise_for_total
from fedpriv.privacy.noise_samplers import GaussianSampler, make_gaussian_sampler
from fedpriv.privacy.plan import NoisePlan, make_noise_plan, plan_epsilons


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


class CentralDPAggregator:
    """Clip, sum, noise and average client updates, then let a Flower strategy apply the result.

    Args (privacy meaning):
        inner: the wrapped aggregator; sees only the noised average, never a raw update.
        plan: per-round noise multipliers, sampling scheme and rate the accountant assumes, delta.
        clipping: the per-client L2 bound (the sensitivity of one user's contribution).
        clip_on: ``server`` or ``client`` (who clips first; the guarantee is the same).
        secure_rng: draw the noise unpredictably (for release); ``False`` seeds numpy's generator
            from ``seed`` and the round (reproducible research runs, NOT for release).
        noise_sampler: ``numpy`` (PCG64 seeded with 128 bits from the OS CSPRNG, float Gaussian:
            fast, not floating-point safe) or ``opendp`` (OpenDP's exact Gaussian mechanism on
            OpenSSL's CSPRNG, floating-point safe: the choice for a release); see
            :mod:`fedpriv.privacy.noise_samplers`. No generator state is ever saved.
    """

    def __init__(
        self,
        inner: Any,
        plan: NoisePlan,
        clipping: ClippingState,
        *,
        clip_on: str = "server",
        secure_rng: bool = True,
        seed: int = 0,
        noise_sampler: str = "numpy",
    ):
        self.inner = inner
        self.plan = plan
        self.clipping = clipping
        self.clip_on = clip_on
        self.secure_rng = secure_rng
        self.ledger = PrivacyLedger()
        self.noise_sampler = noise_sampler
        self._seed = seed
        self._sampler = make_gaussian_sampler(noise_sampler) if secure_rng else None
        self._planned = plan_epsilons(plan)
        self._round_clip_norm: float | None = None
        self._noise_override: float = 1.0  # test-only hook: scale of the noise actually drawn
        self.audit: Any = None  # fedpriv.audit.CanaryAudit when audit.enabled (issue 7)

    @classmethod
    def from_config(cls, rc: RunConfig, inner: Any) -> "CentralDPAggregator":
        plan = make_noise_plan(rc)
        p = rc.privacy
        count_std = p.clipped_count_stddev
        if p.clipping == "adaptive" and count_std is None:
            # Andrew et al. suggest E[m]/20; a small cohort needs more so that the update keeps
            # most of the noise budget (sigma_b >= z gives the update at most 1.155 z).
            count_std = max(plan.denominator / 20.0, max(plan.noise_multipliers))
        clipping = ClippingState(
            norm=p.clip_norm,
            adaptive=p.clipping == "adaptive",
            target_unclipped_quantile=p.target_unclipped_quantile,
            learning_rate=p.clip_lr,
            count_stddev=float(count_std or 0.0),
        )
        if clipping.adaptive:  # fail now, not mid-run, if sigma_b leaves no room for the update noise
            for z in set(plan.noise_multipliers) - {0.0}:
                update_noise_for_total(z, clipping.count_stddev)
        agg = cls(inner, plan, clipping, clip_on=p.clip_on, secure_rng=p.secure_rng, seed=rc.seed,
                  noise_sampler=p.noise_sampler)
        if rc.audit.enabled:  # canary clients (fedpriv.audit.canaries); audit.noise_scale != 1 only in audit runs
            from fedpriv.audit import CanaryAudit

            agg.audit = CanaryAudit.from_config(rc, plan)
            agg._noise_override = rc.audit.noise_scale
        return agg

    # -- the round ---------------------------------------------------------------------------
    def noise_multiplier(self, server_round: int) -> float:
        """The total noise multiplier of round ``server_round`` (what the ledger records)."""
        return self.plan.noise_multipliers[server_round - 1]

    def _noise_source(self, server_round: int) -> GaussianSampler:
        """The run's unpredictable sampler; a seeded run draws each round from (seed, round), so
        that a resumed research run reproduces the uninterrupted one without saving any state."""
        if self._sampler is not None:
            return self._sampler
        return make_gaussian_sampler("numpy", (self._seed + 104_729) * 1_000_003 + server_round)

    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Any) -> dict[str, Any]:
        from fedpriv.federation import StopRun

        if server_round > len(self.plan.noise_multipliers):
            raise StopRun(f"the privacy plan covers {len(self.plan.noise_multipliers)} rounds")
        if self.plan.target_epsilon is not None:
            trial = self.ledger.copy()
            self.plan.record_round(trial, self.noise_multiplier(server_round))
            eps = trial.epsilon(self.plan.delta, self.plan.accountant)
            if eps > self.plan.target_epsilon * (1 + 1e-9):
                raise StopRun(
                    f"privacy budget: round {server_round} would bring epsilon to {eps:.3f} > target {self.plan.target_epsilon}"
                )
        self._round_clip_norm = self.clipping.norm
        self.inner.begin_round(server_round, arrays, grid)
        return {"clip-norm": self._round_clip_norm} if self.clip_on == "client" else {}

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> tuple[ArrayRecord | None, dict[str, Any]]:
        clip_norm = self._round_clip_norm if self._round_clip_norm is not None else self.clipping.norm
        z_total = self.noise_multiplier(server_round)
        adaptive_noise = self.clipping.adaptive and z_total > 0
        z_update = update_noise_for_total(z_total, self.clipping.count_stddev) if adaptive_noise else z_total

        global_np = updates.from_record(arrays)
        updates.check_float_arrays(global_np)
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_np.items()}
        norms, unclipped, losses = [], 0, []
        for msg in replies:
            new = updates.from_record(msg.content["arrays"])
            clipped, norm, was_clipped = updates.clip(updates.difference(new, global_np), clip_norm)
            total = updates.add(total, clipped)
            norms.append(norm)
            unclipped += 0 if was_clipped else 1
            loss = msg.content["metrics"].get("train_loss")
            if loss is not None:
                losses.append(float(loss))

        canaries_in = 0
        if self.audit is not None:  # inserted canaries sampled this round join the clipped sum, before the noise
            total, canaries_in = self.audit.add_canaries(server_round, total, clip_norm)
        denom = self.plan.denominator + (self.audit.expected_per_round if self.audit is not None else 0.0)
        noise_std_sum = z_update * clip_norm * self._noise_override
        signal_norm = updates.l2_norm(total) / denom
        sampler = self._noise_source(server_round)
        noised_mean = {k: sampler.add_noise(v, noise_std_sum) / denom for k, v in total.items()}

        noisy_unclipped = None
        if self.clipping.adaptive:
            # Andrew et al. 2021: each bit is centred at 1/2 (sensitivity 1/2), noised, and
            # uncentred with the public E[m]; the reply count itself is never used.
            bits = self._unclipped_bits(replies, norms, clip_norm)
            centred_sum = np.array([float(np.sum(np.asarray(bits) - 0.5))])
            centred = float(sampler.add_noise(centred_sum, self.clipping.count_stddev)[0])
            noisy_unclipped = centred / denom + 0.5
        self.plan.record_round(self.ledger, z_total)

        new_global = {k: (global_np[k].astype(np.float64) + noised_mean[k]).astype(global_np[k].dtype) for k in global_np}
        synthetic = Message(
            RecordDict({"arrays": updates.to_record(new_global), "metrics": MetricRecord({"num-examples": 1.0})}),
            dst_node_id=0,
            message_type="train",
        )
        new_arrays, _ = self.inner.aggregate(server_round, arrays, [synthetic])

        if self.audit is not None:  # the release (noised average) and the model after it, for the auditor
            self.audit.observe_round(
                server_round, noised_mean, global_np, new_arrays if new_arrays is not None else new_global,
                canaries_in=canaries_in, noise_multiplier_drawn=noise_std_sum / clip_norm,
                count_stddev=self.clipping.count_stddev if self.clipping.adaptive else 0.0,
            )

        if self.clipping.adaptive and noisy_unclipped is not None:
            self.clipping.update(noisy_unclipped)

        eps = self.ledger.epsilon(self.plan.delta, self.plan.accountant)
        d = updates.num_parameters(global_np)
        q = np.quantile(norms, [0.1, 0.5, 0.9]) if norms else [math.nan] * 3
        metrics: dict[str, Any] = {
            "epsilon": eps,
            "planned_epsilon": self._planned[server_round - 1] if self._planned else math.nan,
            "delta": self.plan.delta,
            "noise_multiplier": z_total,
            "update_noise_multiplier": z_update,
            "clip_norm": clip_norm,
            "clipped_fraction": (1.0 - noisy_unclipped) if noisy_unclipped is not None else (1.0 - unclipped / len(replies) if replies else math.nan),
            "noise_std": noise_std_sum / denom,
            "snr": signal_norm / (noise_std_sum / denom * math.sqrt(d)) if noise_std_sum > 0 else math.inf,
            "update_norm_p10": float(q[0]),
            "update_norm_p50": float(q[1]),
            "update_norm_p90": float(q[2]),
            "cohort_size": len(replies),
            "train_loss": float(np.mean(losses)) if losses else math.nan,
        }
        if self.audit is not None:
            metrics["audit_canaries_in_round"] = canaries_in
        return new_arrays, metrics

    def reply_problem(self, reply: Message, global_arrays: dict[str, np.ndarray]) -> str | None:
        """Why a reply must not enter the clipped sum (None if it may): malformed or non-finite
        arrays, or (client clipping) an unclipped bit other than 0 or 1, which would move the
        adaptive clip norm anywhere. Weights are not read: the sum is unweighted."""
        try:
            problem = updates.update_problem(updates.from_record(reply.content["arrays"]), global_arrays)
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed reply ({type(exc).__name__}: {exc})"
        if problem is None and self.clip_on == "client":
            bit = reply.content["metrics"].get("unclipped") if "metrics" in reply.content else None
            if bit is not None and float(bit) not in (0.0, 1.0):
                problem = f"unclipped bit is {bit}, not 0 or 1"
        return problem

    def covered_metric_keys(self) -> tuple[str, ...]:
        """Round metrics covered by the guarantee (what :mod:`fedpriv.privacy.disclosure` may publish):
        the plan's figures and, under adaptive clipping, the clip norm and the clipped fraction,
        which come from the noised count. The raw ones (update-norm quantiles, snr, cohort size,
        training loss, and the clipped fraction under fixed clipping) are operator-only."""
        keys = ("epsilon", "planned_epsilon", "delta", "noise_multiplier", "update_noise_multiplier", "clip_norm",
                "noise_std")
        return keys + (("clipped_fraction",) if self.clipping.adaptive else ())

    def _unclipped_bits(self, replies: list[Message], norms: list[float], clip_norm: float) -> list[float]:
        """1 for an update within the clip norm. Under client clipping the client says so itself
        (its update arrives already clipped); the server's own check covers everyone else."""
        bits = []
        for msg, norm in zip(replies, norms):
            reported = msg.content["metrics"].get("unclipped") if self.clip_on == "client" else None
            bits.append(float(reported) if reported is not None else float(norm <= clip_norm))
        return bits

    # -- persistence and reporting ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "ledger": self.ledger.state_dict(),
            "clip_norm": self.clipping.norm,
            "audit": self.audit.state_dict() if self.audit is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"])
        self.clipping.norm = float(state["clip_norm"])
        if self.audit is not None and state.get("audit") is not None:
            self.audit.load_state_dict(state["audit"])

    def privacy_report(self) -> dict[str, Any]:
        report = self.plan.report(self.ledger, clipping=self.clipping, clip_on=self.clip_on, secure_rng=self.secure_rng)
        report["randomness"] = randomness_words(self.noise_sampler, self.secure_rng)
        if self.noise_sampler == "opendp":
            report["caveats"].append(
                "noise_sampler=opendp rounds each noised value to a grid of 2^k with k = floor(log2 std) - 52; "
                "OpenDP's own privacy map charges this as a relative increase of rho below 1e-12 for these model "
                "sizes, far below the accountant's own discretisation, and the ledger does not add it"
            )
        return report
