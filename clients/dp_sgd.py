"""Example-level DP-SGD on one client (Opacus), and the client's own privacy ledger.

Privacy unit: one training example of this client, under the **zero-out** (replace-by-null)
neighbouring relation: two data sets are neighbours when one example is replaced by a null
example that contributes a zero gradient. The client's row count ``n`` is public (it sets the
sampling rate ``q``, the step count and the ``num-examples`` the reply carries), so the figure is
*not* an add/remove-one guarantee, which would have to hide ``n``. Every DP-SGD step is a
Poisson-subsampled Gaussian mechanism over the client's ``n`` rows: each row joins the step's
batch independently with rate ``q``, its gradient is clipped to ``max_grad_norm`` and Gaussian
noise of std ``z * max_grad_norm`` is added to the sum (the same accounting as add/remove-one of
a Poisson-sampled row, which is what zero-out reduces to). The client composes every step it
ever took in a :class:`~fedpriv.privacy.PrivacyLedger` kept in its own
:class:`~fedpriv.client_state.ClientStateStore` under its stable key
(:mod:`clients.identity`), written before the reply leaves it, so the ledger survives any
restart of the client, the node or the server. Only rounds the client trained in are recorded;
a round whose release would take the ledger past ``privacy.local.target_epsilon`` is declined
before any data is touched.

Sampling (mirrors Opacus's ``DPDataLoader.from_data_loader``): ``q = 1 / ceil(n / batch_size)``
(``= batch_size / n`` when ``batch_size`` divides ``n``, slightly less otherwise) and
``int(1 / q) = ceil(n / batch_size)`` steps per epoch, empty batches included: an empty batch is a
step that releases pure noise, it is never skipped or resampled (skipping would reveal that the
batch was empty). The ledger records the steps the sampler is defined to take; the steps actually
taken are counted by the optimizer and must match, or the round fails without a reply.

Calibration: with a target, the client calibrates its noise for ``E`` participations of
``epochs * ceil(n / batch_size)`` steps each, with the run's schedule shape (see
:func:`planned_participations` for ``E`` and :func:`noise_plan` for how the shape maps onto a
client's participations), so that its epsilon after ``E`` rounds is at most the target.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client_state import ClientStateStore
from fedpriv.config import LocalPrivacyConfig, RunConfig
from fedpriv.errors import ClientError
from fedpriv.privacy import schedules
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.privacy.plan import schedule_shape

log = logging.getLogger("fedpriv.client.dp_sgd")

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
STATE_PREFIX = "ledger-"
_STATE_VERSION = 2


class DPSGDError(ClientError):
    """A model or a setting Opacus cannot train privately (reported as the client's error)."""


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
        raise ValueError(f"DP-SGD needs at least one training row, got {n}")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size}, {epochs}")
    batches = math.ceil(n / batch_size)  # len(DataLoader(..., batch_size, drop_last=False))
    q = 1 / batches  # DPDataLoader.from_data_loader: sample_rate = 1 / len(data_loader)
    return SamplingPlan(n, batch_size, epochs, q, int(1 / q))  # UniformWithReplacementSampler.steps


# ------------------------------------------------------------------------------------ the model


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """``model`` itself when Opacus accepts it, else a fixed copy (BatchNorm -> GroupNorm, ...).

    Raises :class:`DPSGDError` naming the layers Opacus can neither handle nor replace.
    """
    from opacus.validators import ModuleValidator

    model.train()
    if not ModuleValidator.validate(model, strict=False):
        return model
    fixed = ModuleValidator.fix(model)
    fixed.train()
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise DPSGDError("the model has layers Opacus cannot train privately, even after "
                         f"ModuleValidator.fix: {'; '.join(str(e) for e in errors)}")
    log.info("DP-SGD: the model was changed by ModuleValidator.fix to be Opacus-compatible")
    return fixed


def _plain_module(module: nn.Module) -> nn.Module:
    """The model inside Opacus's wrapper (its state dict has no ``_module.`` prefix)."""
    return getattr(module, "_module", module)


# ------------------------------------------------------------------------------------- training


@dataclass
class DPSGDResult:
    model: nn.Module  # the trained plain module (not the GradSampleModule)
    train_loss: float  # mean loss over the examples the Poisson batches held
    steps: int  # noisy optimizer steps actually taken
    sample_rate: float
    noise_multiplier: float
    empty_batches: int
    examples_seen: int
    opacus_history: list[tuple[float, float, int]]  # Opacus's own accountant's view, a cross-check


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return g


def _noise_only_step(optimizer: Any) -> None:
    """An empty Poisson batch: a step whose clipped sum is zero, so it releases noise alone.

    Opacus's functorch / ew modes cannot run a model on a batch of size 0; a zero-length
    per-sample gradient makes ``DPOptimizer`` clip nothing, add the noise and step as usual.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def train_dp_sgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    grad_sample_mode: str = "hooks",
    clipping: str = "flat",
    max_physical_batch_size: int = 256,
    secure_mode: bool = False,
    sampling_seed: int | None = None,
    noise_seed: int | None = None,
    device: str = "cpu",
) -> DPSGDResult:
    """Train ``model`` with DP-SGD (a fresh ``PrivacyEngine``) on (x, y); returns the plain module.

    Privacy meaning of the arguments: each example's gradient is clipped to ``max_grad_norm``
    (``clipping="per_layer"`` splits it evenly, ``max_grad_norm / sqrt(#tensors)`` per tensor, so
    the whole gradient's norm bound stays ``max_grad_norm``); noise std is
    ``noise_multiplier * max_grad_norm``; batches are Poisson samples (:func:`sampling_plan`).
    ``max_physical_batch_size`` only splits computation. ``secure_mode`` draws noise and batches
    from a CSPRNG (needs ``torchcsprng``). Otherwise ``sampling_seed`` / ``noise_seed`` seed
    PyTorch generators (``None``: from the OS's entropy, unpredictable but not a CSPRNG).
    Weight decay, momentum and the FedProx term act on the noised gradient (post-processing).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise DPSGDError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}")
    if clipping not in ("flat", "per_layer"):
        raise DPSGDError(f"clipping must be flat or per_layer, got {clipping!r}")
    if grad_sample_mode == "ghost" and clipping != "flat":
        raise DPSGDError("grad_sample_mode=ghost supports only clipping=flat")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise DPSGDError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    from opacus import PrivacyEngine

    plan = sampling_plan(len(x), batch_size, epochs)
    module = make_dp_compatible(model).to(device)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32 if np.issubdtype(x.dtype, np.floating) else x.dtype))
    yt = torch.from_numpy(np.asarray(y)).long()
    loader = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=False,
                        generator=None if secure_mode else _generator(sampling_seed))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    norm: float | list[float] = max_grad_norm
    if clipping == "per_layer":
        norm = [max_grad_norm / math.sqrt(len(params))] * len(params)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        try:
            engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
        except ImportError as exc:
            raise DPSGDError(f"privacy.local.secure_mode=true needs a CSPRNG for Opacus: {exc}") from None
        try:
            made = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                criterion=nn.CrossEntropyLoss(),
                noise_multiplier=float(noise_multiplier),
                max_grad_norm=norm,
                poisson_sampling=True,
                clipping=clipping,
                grad_sample_mode=grad_sample_mode,
                noise_generator=None if secure_mode else _generator(noise_seed),
            )
        except Exception as exc:  # noqa: BLE001 - Opacus raises many types for unsupported layers
            raise DPSGDError(f"Opacus cannot wrap the model (grad_sample_mode={grad_sample_mode}): "
                             f"{type(exc).__name__}: {exc}") from None
        if grad_sample_mode == "ghost":
            gsm, dp_optimizer, criterion, dp_loader = made
        else:
            gsm, dp_optimizer, dp_loader = made
            criterion = nn.CrossEntropyLoss()
        if abs(dp_loader.sample_rate - plan.sample_rate) > 1e-12 or len(dp_loader) != plan.steps_per_epoch:
            raise DPSGDError(f"Opacus's loader (q={dp_loader.sample_rate}, {len(dp_loader)} steps) differs from "
                             f"the accounted plan (q={plan.sample_rate}, {plan.steps_per_epoch} steps)")

        steps = 0
        accountant_hook = dp_optimizer.step_hook
        start = [p.detach().clone() for p in dp_optimizer.params] if proximal_mu > 0 else None

        def on_noisy_step(opt: Any) -> None:
            nonlocal steps
            steps += 1
            if start is not None:  # FedProx: added to the noised gradient (post-processing)
                for p, p0 in zip(opt.params, start):
                    p.grad.add_(p.detach() - p0, alpha=proximal_mu)
            if accountant_hook is not None:
                accountant_hook(opt)

        dp_optimizer.attach_step_hook(on_noisy_step)
        gsm.train()
        try:
            loss_sum, seen, empty = _run_epochs(gsm, dp_optimizer, criterion, dp_loader, epochs,
                                                max_physical_batch_size, grad_sample_mode, device)
        except Exception as exc:  # noqa: BLE001 - e.g. a layer the chosen grad_sample_mode cannot handle
            raise DPSGDError(f"DP-SGD training failed (grad_sample_mode={grad_sample_mode}): "
                             f"{type(exc).__name__}: {exc}") from exc
        dp_optimizer.zero_grad(set_to_none=True)
    if steps != plan.steps:
        raise DPSGDError(f"DP-SGD took {steps} noisy steps, the accounted plan has {plan.steps}")
    plain = _plain_module(gsm)
    if hasattr(gsm, "_close"):
        gsm._close()  # remove Opacus's hooks: the plain module goes back to the caller
    plain.eval()
    return DPSGDResult(
        model=plain,
        train_loss=loss_sum / seen if seen else float("nan"),
        steps=steps,
        sample_rate=plan.sample_rate,
        noise_multiplier=float(noise_multiplier),
        empty_batches=empty,
        examples_seen=seen,
        opacus_history=[tuple(h) for h in engine.accountant.history],
    )


def _run_epochs(gsm: nn.Module, optimizer: Any, criterion: Any, loader: DataLoader, epochs: int,
                max_physical_batch_size: int, grad_sample_mode: str, device: str) -> tuple[float, int, int]:
    """The DP-SGD loop: Poisson logical batches, split into physical ones; (loss sum, examples, empty batches)."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    loss_sum, seen, empty = 0.0, 0, 0
    for _ in range(epochs):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical_batch_size,
                                optimizer=optimizer) as physical:
            for xb, yb in physical:
                optimizer.zero_grad(set_to_none=True)
                if len(yb) == 0:
                    empty += 1  # only an empty logical batch yields an empty physical one
                    if grad_sample_mode == "ghost":  # ghost clipping runs a model on 0 rows fine
                        criterion(gsm(xb.to(device)), yb.to(device)).backward()
                        optimizer.step()
                    else:
                        _noise_only_step(optimizer)
                    continue
                xb, yb = xb.to(device), yb.to(device)
                loss = criterion(gsm(xb), yb)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
    return loss_sum, seen, empty


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
            raise DPSGDError(f"privacy.local.expected_rounds must be >= 1, got {lo.expected_rounds}")
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
        raise DPSGDError(f"privacy.local.target_epsilon={target:g}: {exc}") from None
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
        raise DPSGDError("privacy.local needs target_epsilon or noise_multiplier")
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
            raise DPSGDError(f"unsupported client ledger version {rec.get('version')!r}")
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
        raise DPSGDError(f"client state for {client_key!r} holds the ledger of {book.client_key!r}")
    return book


def save_client_ledger(store: ClientStateStore, book: ClientLedger) -> None:
    """Durably, before anything the round produced leaves the client."""
    store.save(STATE_PREFIX + book.client_key, book.to_record())


# ------------------------------------------------------------------------------ one client's round


def _seeds(rc: RunConfig, server_round: int, client_id: int) -> tuple[int | None, int | None]:
    """Seeds of the batch sampler and of the noise: unpredictable unless ``privacy.secure_rng=false``."""
    if rc.privacy.secure_rng:
        return None, None
    base = ((rc.seed * 1_000_003 + server_round) * 1_000_033 + client_id) * 4
    return base + 1, base + 2


def dp_sgd_round(
    rc: RunConfig, data: Any, model: nn.Module, store: ClientStateStore, *, client_key: str, server_round: int,
    device: str = "cpu",
) -> tuple[nn.Module | None, dict[str, float]]:
    """One client's DP-SGD round with its ledger in its own ``store``, under ``client_key``.

    Returns (trained plain model, metrics), or (None, metrics with ``declined=1.0``) when the
    round would take the client past its budget: then nothing is trained and nothing recorded.

    What the metrics carry is what the guarantee covers: the client's row count (public under
    the zero-out relation the epsilon holds under) and figures computed from it and from the
    client's own ledger (epsilon, steps, noise multiplier, sampling rate, rounds, declined),
    none of which depends on the values of its examples. No training loss: it is a raw function
    of the data.
    """
    lo: LocalPrivacyConfig = rc.privacy.local
    t = rc.train
    client_id = int(data.client_id)
    model_before = model
    plan = sampling_plan(len(data.x_train), t.batch_size, t.local_epochs)
    model = make_dp_compatible(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in model_before.state_dict().items()}:
        raise DPSGDError("the model Opacus can train (after ModuleValidator.fix) has other arrays than the "
                         "global model, so the server could not aggregate it: build the global model "
                         "Opacus-compatible (GroupNorm instead of BatchNorm)")
    book = load_client_ledger(store, client_key)
    key = noise_plan_key(rc, plan)
    if book.plan_key != key or not book.plan:  # calibrate once; kept with the ledger (deployment
        book.plan_key, book.plan = key, noise_plan(rc, plan)  # starts a new process per message)
    z = book.plan[min(book.rounds, len(book.plan) - 1)]
    if lo.delta >= 1.0 / plan.n:
        log.warning("client %s: privacy.local.delta=%g is not below 1/n = 1/%d", client_key, lo.delta, plan.n)

    accountant = rc.privacy.accountant
    next_ledger = book.ledger.copy()
    next_ledger.record(z, plan.sample_rate, "poisson", count=plan.steps)
    eps_next = next_ledger.epsilon(lo.delta, accountant)
    metrics = {
        "num-examples": float(plan.n),
        "local_epsilon": float(book.ledger.epsilon(lo.delta, accountant)),
        "local_steps": 0.0,
        "local_noise_multiplier": float(z),
        "local_sample_rate": float(plan.sample_rate),
        "local_rounds": float(book.rounds),
        "declined": 1.0,
    }
    if lo.target_epsilon is not None and eps_next > lo.target_epsilon:
        book.declined += 1
        save_client_ledger(store, book)
        log.info("client %s declines round %d: epsilon would reach %.3f > budget %.3f",
                 client_key, server_round, eps_next, lo.target_epsilon)
        return None, metrics

    sampling_seed, noise_seed = _seeds(rc, server_round, client_id)
    result = train_dp_sgd(
        model, data.x_train, data.y_train,
        epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=rc.strategy.proximal_mu if rc.strategy.name == "fedprox" else 0.0,
        noise_multiplier=z, max_grad_norm=lo.max_grad_norm, grad_sample_mode=lo.grad_sample_mode,
        clipping=lo.clipping, max_physical_batch_size=lo.max_physical_batch_size,
        secure_mode=lo.secure_mode, sampling_seed=sampling_seed, noise_seed=noise_seed, device=device,
    )
    # The model leaves the client only with this reply: record the round now, before replying.
    book.ledger = next_ledger
    book.rounds += 1
    book.steps += plan.steps
    book.last_round = int(server_round)
    save_client_ledger(store, book)
    metrics.update({
        "local_epsilon": float(eps_next),
        "local_steps": float(result.steps),
        "local_rounds": float(book.rounds),
        "declined": 0.0,
    })
    return result.model, metrics
