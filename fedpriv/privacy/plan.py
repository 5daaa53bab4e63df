"""A run's central-DP plan: per-round noise, the sampling the accountant assumes, delta, budget.

Built once from the configuration before the first round (an impossible request fails here,
before Ray starts), then used by the central-DP strategy to record each round's release and to
write the run's privacy report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from fedpriv.config import ConfigError, RunConfig
from fedpriv.sampling import cyclic_groups, cyclic_rate

from . import cycles
from .budget import check_delta, default_delta
from .correlated import banded_sqrt_coefficients
from .ledger import PrivacyLedger
from .schedules import NoiseSchedule, Phases, Shape, calibrate, constant, cosine, linear, phases, planned_epsilons, step


@dataclass
class NoisePlan:
    """What the accountant assumes about every round of a run.

    noise_multipliers: total noise multiplier z_t of each round (std of the noise on the sum of
        clipped updates, in units of the clip norm).
    sampling / sampling_rate / population / sample_size: how clients are chosen each round
        (``poisson`` with rate q; ``fixed``: sample_size of population without replacement;
        ``all``: no sampling, no amplification).
    denominator: the expected cohort the noised sum is divided by (sensitivity C / denominator).
    delta: the delta every epsilon of this run is reported at.
    target_epsilon: the budget; a round that would exceed it is not run.
    reserved: ``reserved(t)`` = the run's other releases if it stops after round t (analytics, selection:
        :func:`planned_pure_releases`), counted against ``target_epsilon`` before round t, so that the
        budget covers the whole run even when the noise is fixed (privacy.noise_multiplier).
    """

    noise_multipliers: list[float]
    sampling: str
    sampling_rate: float
    population: int
    sample_size: int | None
    denominator: float
    delta: float
    accountant: str
    target_epsilon: float | None
    calibrated: bool
    delta_rule: str
    caveats: list[str] = field(default_factory=list)
    reserved: Callable[[int], PrivacyLedger] | None = None
    mechanism: str = "gaussian"  # gaussian | tree | bandmf (fedpriv.privacy.correlated)
    cycle: int = 1  # sampling=cyclic: the number of groups G (rounds between two of a client's chances)
    bands: int = 1  # bandmf: the strategy matrix's bands (<= cycle)

    def record_round(self, ledger: PrivacyLedger, noise_multiplier: float, server_round: int) -> None:
        """Record round ``server_round``'s release (the noised sum, and under adaptive clipping the noised
        count); under cyclic sampling only the rounds that cost anything record (fedpriv.privacy.cycles)."""
        record_release(ledger, noise_multiplier, server_round, sampling=self.sampling, rate=self.sampling_rate,
                       mechanism=self.mechanism, cycle=self.cycle, population=self.population,
                       sample_size=self.sample_size)

    def ledger_kwargs(self) -> dict[str, Any]:
        return {
            "sampling_rate": self.sampling_rate,
            "sampling": self.sampling,
            "population": self.population if self.sampling == "fixed" else None,
            "sample_size": self.sample_size if self.sampling == "fixed" else None,
        }

    def report(self, ledger: PrivacyLedger, *, rounds: int, clipping: Any, clip_on: str,
               secure_rng: bool) -> dict[str, Any]:
        """privacy.json: the guarantee in words, the figures, the ledger's events, the caveats."""
        eps = ledger.epsilon(self.delta, self.accountant) if ledger.num_releases else 0.0
        cross = ledger.epsilon_report(self.delta) if ledger.num_releases else {}
        caveats = list(self.caveats) + list(ledger.caveats)
        if not secure_rng:
            caveats.append("NOT FOR RELEASE: noise drawn from a seeded, reproducible generator (privacy.secure_rng=false)")
        change = ("replacing all of its data by another client's (replace-one: the number of clients is public)"
                  if self.sampling == "fixed" else "adding or removing all of its data (add/remove-one)")
        if self.sampling == "cyclic":  # the groups are fixed by id: the roster of ids is public, a client's data is not
            change = ("adding or removing all of its data while the roster of client ids, hence every client's group, "
                      "stays fixed (add/remove-one on a public roster)")
        words = (
            f"User-level differential privacy: for any one client, {change} changes the distribution of everything the server released over the {rounds} completed round(s) "
            f"(the sequence of noised model updates{' and noised clipped-counts' if clipping.adaptive else ''}, hence the "
            f"final model) by at most (epsilon={eps:.4g}, delta={self.delta:.3g}). It assumes {self._sampling_words()}, "
            f"each client's update clipped to L2 norm {'following the adaptive norm' if clipping.adaptive else clipping.norm} "
            f"(clipped on the {clip_on}), {self._noise_words()}, and the ledger's {self.accountant.upper()} "
            "accountant. It does not protect against a server that deviates from this code, and it says nothing about a "
            "single example's privacy beyond that of its client. What the run published is listed under 'outputs'; "
            "figures not covered by this guarantee went only to the operator (operator_only/)."
        )
        summary = {
            "epsilon": eps,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "target_epsilon": self.target_epsilon,
            "privacy_caveats": caveats,
        }
        return {
            "summary": summary,
            "guarantee": words,
            "unit": "user (client)",
            "neighbouring_relation": ledger.neighboring_relation,
            "epsilon": eps,
            "delta": self.delta,
            "delta_rule": self.delta_rule,
            "accountant": self.accountant,
            "epsilon_by_accountant": cross,
            "sampling": {
                "scheme": self.sampling,
                "rate": self.sampling_rate,
                "population": self.population,
                "sample_size": self.sample_size,
                "noise_denominator": self.denominator,
                "groups": self.cycle if self.sampling == "cyclic" else None,
            },
            "mechanism": self.mechanism_report(),
            "noise_multipliers_planned": self.noise_multipliers,
            "calibrated": self.calibrated,
            "clipping": {
                "mode": "adaptive" if clipping.adaptive else "fixed",
                "clip_on": clip_on,
                "final_norm": clipping.norm,
                "count_stddev": clipping.count_stddev if clipping.adaptive else None,
            },
            "secure_rng": secure_rng,
            "events": ledger.state_dict()["events"],
            "caveats": caveats,
        }

    def _noise_words(self) -> str:
        if self.mechanism == "tree":
            return (f"Gaussian noise added by a trusted server to every node of a binary tree over the rounds, the "
                    f"tree restarted every {self.cycle} rounds (DP-FTRL, Kairouz et al. 2021)")
        if self.mechanism == "bandmf":
            return (f"Gaussian noise added by a trusted server, correlated across rounds by a {self.bands}-banded "
                    "strategy matrix with unit column norms (BandMF, Choquette-Choo et al. 2023)")
        return "independent Gaussian noise added by a trusted server each round"

    def mechanism_report(self) -> dict[str, Any]:
        """privacy.json's mechanism section: which noise, and what its accounting assumes."""
        out: dict[str, Any] = {"name": self.mechanism}
        if self.mechanism == "bandmf":
            sampled = "Poisson-sampled (q={:.4g}) ".format(self.sampling_rate) if self.sampling_rate < 1 else ""
            out.update(bands=self.bands, coefficients=[float(c) for c in banded_sqrt_coefficients(self.bands)],
                       coefficients_are="the banded square root of the prefix-sum matrix, scaled to unit norm",
                       accounting=f"one {sampled}Gaussian per cycle of {self.cycle} rounds (amplified BandMF)")
        if self.mechanism == "tree":
            out.update(restart_every=self.cycle, accounting="one Gaussian per released node above a client's leaf "
                       "(positions 1, 2, 4, ... of each tree), no amplification by sampling")
        return out

    def _sampling_words(self) -> str:
        if self.sampling == "cyclic":
            return (f"the clients are split into {self.cycle} fixed groups (client i in group i mod {self.cycle}), round t "
                    f"draws only from group (t-1) mod {self.cycle}, each member independently with probability "
                    f"q={self.sampling_rate:.4g}, so a client's chances are {self.cycle} rounds apart (cyclic "
                    f"{'Poisson ' if self.sampling_rate < 1 else ''}sampling)")
        if self.sampling == "poisson":
            return f"each client joins each round independently with probability q={self.sampling_rate:.4g} (Poisson sampling)"
        if self.sampling == "fixed":
            return f"each round samples exactly {self.sample_size} of {self.population} clients uniformly without replacement"
        return "every client takes part in every round (no amplification by sampling)"


def record_release(ledger: PrivacyLedger, noise_multiplier: float, server_round: int, *, sampling: str, rate: float,
                   mechanism: str, cycle: int, population: int, sample_size: int | None) -> None:
    """One round's training release in ``ledger``: a Gaussian with the round's sampling, or under cyclic
    sampling what that round costs for the mechanism (fedpriv.privacy.cycles)."""
    if sampling == "cyclic":
        cycles.record(ledger, mechanism, cycle, rate, noise_multiplier, server_round)
        return
    fixed = sampling == "fixed"
    ledger.record(noise_multiplier, rate, sampling, 1, population=population if fixed else None,
                  sample_size=sample_size if fixed else None)


def schedule_shape(rc: RunConfig) -> Shape:
    s = rc.schedule
    if s.name == "constant":
        return constant(1.0)
    if s.name == "linear":
        return linear(1.0, s.end_factor)
    if s.name == "cosine":
        return cosine(1.0, s.end_factor)
    if s.name == "step":
        return step(s.gamma, s.step_size)
    if s.name == "phases":
        if not s.phases:
            raise ConfigError("config key 'schedule.phases': give a list of [rounds, relative multiplier] pairs")
        try:
            return phases([(int(n), float(v)) for n, v in s.phases])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config key 'schedule.phases': {exc}") from None
    raise ConfigError(f"config key 'schedule.name': unknown schedule {s.name!r}")


def make_noise_plan(rc: RunConfig) -> NoisePlan:
    """The central-DP plan of ``rc``: calibrated noise, or the given one; fails early and clearly."""
    p = rc.privacy
    q = 1.0 if rc.sampling == "all" else rc.clients_per_round / rc.num_clients
    expected = rc.num_clients if rc.sampling == "all" else rc.clients_per_round
    cycle = cyclic_groups(rc.num_clients, rc.clients_per_round, rc.cyclic_groups) if rc.sampling == "cyclic" else 1
    if rc.sampling == "cyclic":
        q = cyclic_rate(rc.num_clients, rc.clients_per_round, cycle)
    population, caveats = rc.num_clients, []
    denominator = float(expected)
    if p.noise_cohort_size is not None:
        # Divide the noised sum by a larger cohort: the noise per coordinate of the average is a
        # deployment's with cohorts of noise_cohort_size; the sum, its noise and the sampling are this
        # run's, so the accounting (and the epsilon) is this run's too.
        denominator = float(p.noise_cohort_size)
        caveats.append(
            f"noise_cohort_size={p.noise_cohort_size}: the noised sum is divided by {p.noise_cohort_size} instead of "
            f"the expected cohort {expected}, so the noise on the average is that of a deployment with cohorts of "
            f"{p.noise_cohort_size} while the update is scaled by {expected}/{p.noise_cohort_size}; the epsilon holds "
            f"for this run as simulated (same sum, same noise z*C, same sampling); what does not carry over to such a "
            f"deployment is the accuracy"
        )
    sample_size = int(expected) if rc.sampling == "fixed" else None

    if p.delta is None:
        delta, delta_rule = default_delta(population), f"delta = min(1e-5, 1/N^1.1) with N={population}"
    else:
        delta, delta_rule = p.delta, "delta set by privacy.delta"
    try:
        check_delta(delta, population)
    except ValueError as exc:
        raise ConfigError(f"config key 'privacy.delta': {exc}") from None

    accountant = "rdp" if rc.sampling == "fixed" else p.accountant
    if rc.sampling == "fixed":
        caveats.append(
            "fixed-size sampling (exactly m of N clients without replacement) is accounted with RDP under the "
            "replace-one relation (one client's data replaced by another's; the number of clients is public), the "
            "only relation dp-accounting supports for sampling without replacement"
            + ("; PLD has no such event, so privacy.accountant=pld is not used" if p.accountant == "pld" else "")
        )
    shape = schedule_shape(rc)
    if p.noise_multiplier is None and p.target_epsilon is not None and math.isinf(p.target_epsilon):
        # epsilon = inf: clipping and the unweighted estimator, no noise (the reference point of a sweep).
        caveats.append("target_epsilon=inf: updates are clipped but NOT noised; this run has no privacy guarantee")
        multipliers, calibrated = [0.0] * rc.num_rounds, False
    elif p.noise_multiplier is not None:
        if p.noise_multiplier <= 0:
            raise ConfigError("config key 'privacy.noise_multiplier': must be > 0 under central DP (0 gives no privacy)")
        rel = NoiseSchedule(shape, rc.num_rounds).noise_multipliers()
        multipliers = [p.noise_multiplier * v / rel[0] for v in rel]
        calibrated = False
    elif p.target_epsilon is not None:
        recorder = partial(record_release, sampling=rc.sampling, rate=q, mechanism=p.mechanism, cycle=cycle,
                           population=population, sample_size=sample_size)

        def calibrated_to(target: float) -> list[float]:
            if rc.sampling == "cyclic":
                return [cycles.calibrate_cyclic(p.mechanism, cycle, q, rc.num_rounds, delta, target, accountant)] * rc.num_rounds
            return calibrate(shape, rc.num_rounds, q, rc.sampling, delta, target,
                             population=population if rc.sampling == "fixed" else None, sample_size=sample_size,
                             accountant=accountant).noise_multipliers()

        try:
            pure = planned_pure_releases(rc)
            if pure.num_releases:  # the budget covers the run: the training gets what the other releases leave
                training_target = _training_share(rc, calibrated_to, pure, delta, accountant, recorder)
                caveats.append(
                    f"privacy.target_epsilon={p.target_epsilon:g} budgets the whole run: the training was calibrated to "
                    f"epsilon {training_target:.4g} so that, composed with the planned pure releases "
                    f"({', '.join(f'{r.label} x{r.count}' for r in pure.events)}), the run stays within it")
                multipliers = calibrated_to(training_target)
            else:
                multipliers = calibrated_to(p.target_epsilon)
        except ValueError as exc:
            raise ConfigError(f"config key 'privacy.target_epsilon': {exc}") from None
        calibrated = True
    else:
        raise ConfigError("config key 'privacy': central DP needs privacy.target_epsilon or privacy.noise_multiplier")
    if any(not math.isfinite(z) or z < 0 for z in multipliers) or (0.0 in multipliers and max(multipliers) > 0):
        raise ConfigError("config key 'privacy': the schedule gives a non-positive noise multiplier")
    plan = NoisePlan(
        noise_multipliers=multipliers,
        sampling=rc.sampling,
        sampling_rate=q,
        population=population,
        sample_size=sample_size,
        denominator=denominator,
        delta=delta,
        accountant=accountant,
        target_epsilon=p.target_epsilon,
        calibrated=calibrated,
        delta_rule=delta_rule,
        caveats=caveats,
        # the budget covers the whole run: the stop before each round counts these too
        reserved=partial(planned_pure_releases, rc) if p.target_epsilon is not None else None,
        mechanism=p.mechanism,
        cycle=cycle,
        bands=(p.bands or cycle) if p.mechanism == "bandmf" else 1,
    )
    if not calibrated and p.target_epsilon is not None and math.isfinite(p.target_epsilon):
        first = plan_epsilons(plan)[0]
        if plan.reserved is not None and plan.reserved(1).num_releases:  # round 1 with what a 1-round run releases
            trial = PrivacyLedger()
            plan.record_round(trial, multipliers[0], 1)
            trial.extend(plan.reserved(1))
            first = trial.epsilon(delta, accountant)
        if first > p.target_epsilon:  # the run would stop before its first round
            raise ConfigError(
                f"config key 'privacy.target_epsilon': {p.target_epsilon:g} is spent before round 1: one round at "
                f"noise_multiplier {multipliers[0]:g} already costs epsilon {first:.3g}; raise the noise or the budget"
            )
    return plan


def planned_pure_releases(rc: RunConfig, rounds: int | None = None) -> PrivacyLedger:
    """The pure (user-level) releases a central run plans besides training: analytics=central's label
    histogram (L1 sensitivity 1) and validation releases (L1 sensitivity 2, one per due round), and a
    noisy_max model selection (one, worst case). Their parameters mirror fedpriv.analytics / fedpriv.selection.
    rounds: those of a run that stops after that round (its later validations never happen); None: all."""
    ledger = PrivacyLedger()
    an = rc.analytics
    if an.mode == "central" and an.epsilon_label_histogram is not None:
        ledger.record_laplace(1.0 / an.epsilon_label_histogram, label="label histogram")
    due = (rc.num_rounds if rounds is None else min(rounds, rc.num_rounds)) // an.validation_every
    if an.mode == "central" and an.epsilon_validation is not None and due:
        ledger.record_laplace(1.0 / an.epsilon_validation, due, label="validation accuracy")
    sel = getattr(rc, "selection", None)
    if sel is not None and sel.method == "noisy_max" and sel.epsilon is not None:
        ledger.record_pure_dp(sel.epsilon, label="model selection", mechanism="exponential")
    return ledger


def _training_share(rc: RunConfig, calibrated_to: Any, pure: PrivacyLedger, delta: float, accountant: str,
                    recorder: Callable[[PrivacyLedger, float, int], None]) -> float:
    """The largest training target whose calibrated plan, composed with ``pure``, stays within the run's
    privacy.target_epsilon (bisection on the training target; each step is one calibration: ~0.1 s with
    PLD, ~1 s with RDP)."""
    target = float(rc.privacy.target_epsilon)

    def total(training_target: float) -> float:
        ledger = PrivacyLedger()
        for t, z in enumerate(calibrated_to(training_target), start=1):
            recorder(ledger, z, t)
        ledger.extend(pure)
        return ledger.epsilon(delta, accountant)

    alone = pure.epsilon(delta, accountant)
    if alone >= target:
        raise ValueError(f"the planned analytics / selection releases alone cost epsilon {alone:.4g} >= {target:g}: "
                         "lower their epsilons or raise the budget")
    lo, hi, best = 0.0, target, None
    for _ in range(40):
        mid = (lo + hi) / 2
        try:
            within = total(mid) <= target
        except ValueError:  # so small a training target needs more noise than calibrate allows: go up
            lo = mid
            continue
        if within:
            lo = best = mid
        else:
            hi = mid
        if best is not None and hi - lo <= 0.01 * target:  # within 1% of the best share, always within budget
            break
    if best is None:
        raise ValueError(f"no training budget is left within {target:g} after the planned pure releases "
                         f"(epsilon {alone:.4g} on their own)")
    return best


def plan_epsilons(plan: NoisePlan) -> list[float]:
    """Epsilon after each round if the run follows the plan (for "planned vs spent")."""
    if any(z == 0 for z in plan.noise_multipliers):  # target_epsilon=inf: no noise, no guarantee
        return [math.inf] * len(plan.noise_multipliers)
    if plan.sampling == "cyclic":
        return cycles.epsilons(plan.mechanism, plan.cycle, plan.sampling_rate, plan.noise_multipliers, plan.delta,
                               plan.accountant)
    schedule = NoiseSchedule(Phases(tuple((1, z) for z in plan.noise_multipliers)), len(plan.noise_multipliers))
    kw = plan.ledger_kwargs()
    return planned_epsilons(
        schedule, kw["sampling_rate"], kw["sampling"], plan.delta,
        population=kw["population"], sample_size=kw["sample_size"], accountant=plan.accountant,
    )
