"""Plain local training (SGD, optional FedProx proximal term); evaluation is :func:`fedpriv.task.evaluate`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedpriv.language_model import batch_loss


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Train ``model`` in place on (x, y) with SGD; returns loss and counts.

    ``proximal_mu`` > 0 adds FedProx's (mu/2)||w - w_start||^2, w_start being the received model.
    """
    model.to(device).train()
    xt = torch.from_numpy(np.array(x, dtype=np.float32 if np.issubdtype(x.dtype, np.floating) else x.dtype)).to(device)
    yt = torch.from_numpy(np.array(y)).long().to(device)
    params = [p for p in model.parameters() if p.requires_grad]  # a LoRA model's frozen base stays out
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in _batches(len(xt), batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(model(xt[idx]), xt[idx], yt[idx])
            if start is not None:
                prox = sum(((p - s) ** 2).sum() for p, s in zip(params, start))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return {"train_loss": total / max(steps, 1), "num_examples": float(len(xt)), "steps": float(steps)}
