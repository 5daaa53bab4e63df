"""Example-level DP-SGD on one client with Opacus: the training loop and its Flower-side round.

What the privacy means, the client's plan, its ledger and its budget decision live in
:mod:`fedpriv.privacy.local` (they do not need Opacus); this module trains. Every step is a
Poisson-subsampled Gaussian mechanism (Opacus's ``DPDataLoader``: ``q = 1 / ceil(n / batch_size)``
and ``ceil(n / batch_size)`` steps per epoch, empty batches included: an empty batch is a step that
releases pure noise, never skipped or resampled, since skipping would reveal that the batch was
empty). The steps actually taken are counted by the optimizer and must match the accounted plan,
or the round fails without a reply.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client_state import ClientStateStore
from fedpriv.config import LocalPrivacyConfig, RunConfig
from fedpriv.config_schema import GRAD_SAMPLE_MODES  # Opacus's per-example gradient engines (re-exported)
from fedpriv.errors import ClientError
from fedpriv.language_model import batch_loss
from fedpriv.privacy.local import commit_round, decide_round, sampling_plan

log = logging.getLogger("fedpriv.client.dp_sgd")


class DPSGDError(ClientError):
    """A model or a setting Opacus cannot train privately (reported as the client's error)."""


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


def choose_grad_sample_mode(requested: str, device: str, clipping: str, adapters_only: bool = False) -> str:
    """``requested``, or for ``auto`` the fastest correct Opacus engine for this device, clipping and model.

    Measured with ``scripts/benchmark_dp_sgd.py`` on the project's CNN (every mode first checked
    against a hand-computed clipped gradient): on a CPU ghost clipping costs 1.9x plain SGD per
    example against 4.5-5.2x for the others; on an H200 hooks costs 4.0x (batch 256) against 5.6x
    for ghost, whose second backward pass does not pay off on a GPU. Ghost supports flat clipping only.
    ``adapters_only`` (a LoRA model: a few thousand trained numbers on a frozen base): per-example
    gradients of the adapters are cheap and ghost's second backward pass runs through the whole base,
    so hooks wins (``--workload sent140_lora`` on a CPU: hooks 1.11x plain SGD, ew 1.08x, functorch
    1.29x, ghost 1.71x; ew is within noise of hooks and supports fewer layers).
    The choice changes speed only: every mode computes the same clipped sum (the same privacy).
    """
    if requested != "auto":
        return requested
    if adapters_only:
        return "hooks"
    if clipping != "flat" or device.startswith("cuda"):
        return "hooks"
    return "ghost"


def _generator(seed: int | None, device: str = "cpu") -> torch.Generator:
    """A generator on ``device``: Opacus draws the noise where the gradients live (a CPU generator
    for CUDA gradients fails), the DataLoader's Poisson batches on the CPU."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return g


def _noise_only_step(optimizer: Any, ghost: bool) -> None:
    """An empty Poisson batch: a step whose clipped sum is zero, so it releases noise alone.

    No model is run on it: Opacus's functorch / ew modes cannot run one on a batch of size 0, nor can a
    transformer (its attention reshapes 0 rows ambiguously). For ``DPOptimizer`` a zero-length
    per-sample gradient makes it clip nothing, add the noise and step as usual; ghost clipping's
    optimizer reads the clipped sum from ``p.grad``, so it gets zeros there.
    """
    for p in optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
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
                noise_generator=None if secure_mode else _generator(noise_seed, device),
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


def _float32_grad_samples(optimizer: Any) -> None:
    """Per-example gradients of a bfloat16 forward pass (``model.dtype=bfloat16``) come back in bfloat16:
    cast them to the parameters' float32 before Opacus computes their norms, so that the clip factor,
    and with it the bound ``max_grad_norm`` on every summed gradient, is computed in float32 and not
    rounded to bfloat16's 8 bits (read in bfloat16, a clipped gradient's norm reached 1.006 max_grad_norm)."""
    for p in optimizer.params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:
            p.grad_sample = gs.to(p.dtype)


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
                    _noise_only_step(optimizer, ghost=grad_sample_mode == "ghost")
                    continue
                xb, yb = xb.to(device), yb.to(device)
                loss = batch_loss(gsm(xb), xb, yb, criterion)
                loss.backward()
                _float32_grad_samples(optimizer)
                optimizer.step()
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
    return loss_sum, seen, empty


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
    The metrics are :meth:`~fedpriv.privacy.local.RoundDecision.reply_metrics`: no training loss,
    which is a raw function of the data.
    """
    lo: LocalPrivacyConfig = rc.privacy.local
    t = rc.train
    model_before = model
    model = make_dp_compatible(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in model_before.state_dict().items()}:
        raise DPSGDError("the model Opacus can train (after ModuleValidator.fix) has other arrays than the "
                         "global model, so the server could not aggregate it: build the global model "
                         "Opacus-compatible (GroupNorm instead of BatchNorm)")
    decision = decide_round(rc, len(data.x_train), store, client_key, server_round)
    if decision.declined:
        return None, decision.reply_metrics()
    sampling_seed, noise_seed = _seeds(rc, server_round, int(data.client_id))
    result = train_dp_sgd(
        model, data.x_train, data.y_train,
        epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=rc.strategy.proximal_mu if rc.strategy.name == "fedprox" else 0.0,
        noise_multiplier=decision.noise_multiplier, max_grad_norm=lo.max_grad_norm,
        grad_sample_mode=choose_grad_sample_mode(lo.grad_sample_mode, device, lo.clipping,
                                                 adapters_only=hasattr(model_before, "travelling_parameters")
                                                 and rc.model.finetune == "lora"),
        clipping=lo.clipping,
        max_physical_batch_size=lo.max_physical_batch_size, secure_mode=lo.secure_mode,
        sampling_seed=sampling_seed, noise_seed=noise_seed, device=device,
    )
    commit_round(store, decision, server_round)  # before the model leaves with the reply
    return result.model, decision.reply_metrics(result.steps)
