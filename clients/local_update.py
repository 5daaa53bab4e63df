"""One client's round: train on its rows and return the new model with its metrics.

The privacy-relevant steps hook in here: DP-SGD (``privacy.mode`` local / central_local) and
client-side clipping (``privacy.clip_on=client``).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from clients.training import train
from fedpriv.config import RunConfig
from fedpriv.task import ClientData, pick_device, training_generator


def run_local_update(
    rc: RunConfig, cfg: ConfigRecord, data: ClientData, model: nn.Module, context: Context
) -> tuple[ArrayRecord, dict[str, Any]]:
    server_round = int(cfg["server-round"])
    device = pick_device(rc.device)
    stats = train(
        model,
        data.x_train,
        data.y_train,
        epochs=rc.train.local_epochs,
        batch_size=rc.train.batch_size,
        lr=rc.train.lr,
        momentum=rc.train.momentum,
        weight_decay=rc.train.weight_decay,
        proximal_mu=rc.strategy.proximal_mu if rc.strategy.name == "fedprox" else 0.0,
        generator=training_generator(rc.seed, server_round, data.client_id),
        device=device,
    )
    metrics: dict[str, Any] = {
        "num-examples": float(len(data.x_train)),
        "train_loss": stats["train_loss"],
    }
    return ArrayRecord(model.cpu().state_dict()), metrics
