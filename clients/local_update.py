"""One client's round: train on its rows and return the new model with its metrics.

The privacy-relevant steps hook in here: DP-SGD (``privacy.mode`` local / central_local) and
client-side clipping of the update (``privacy.clip_on=client`` under central DP).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from clients.dp_sgd import dp_sgd_round
from clients.training import train
from fedpriv import updates
from fedpriv.client_state import ClientStateStore
from fedpriv.config import RunConfig
from fedpriv.task import ClientData, pick_device, training_generator


def clip_update_on_client(received: dict[str, np.ndarray], trained: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """The model to send back so that its difference from ``received`` has norm <= ``clip_norm``.

    Returns (arrays, unclipped) where ``unclipped`` is 1.0 when the update needed no clipping
    (the bit adaptive clipping counts; the server adds noise to the count).
    """
    updates.check_float_arrays(received)
    delta, _, was_clipped = updates.clip(updates.difference(trained, received), clip_norm)
    arrays = {k: (received[k].astype(np.float64) + delta[k]).astype(received[k].dtype) for k in received}
    return arrays, 0.0 if was_clipped else 1.0


def run_local_update(
    rc: RunConfig, cfg: ConfigRecord, data: ClientData, model: nn.Module, store: ClientStateStore, client_key: str
) -> tuple[ArrayRecord, dict[str, Any]]:
    """One client's round as its reply carries it: (arrays, metrics); see :func:`local_update`."""
    trained, metrics = local_update(rc, cfg, data, model, store, client_key)
    return updates.to_record(trained), metrics


def local_update(
    rc: RunConfig, cfg: ConfigRecord | dict[str, Any], data: ClientData, model: nn.Module, store: ClientStateStore,
    client_key: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train one round; returns the trained model's arrays and the metrics the reply carries.

    Args (privacy meaning):
        store: the client's own persistent state (its DP-SGD ledger lives there).
        client_key: the client's stable identity, the key of its ledger.
    Under local DP the metrics hold only figures the guarantee covers (see
    :func:`clients.dp_sgd.dp_sgd_round`); otherwise they add the raw training loss, which only
    the trusted server sees (it is an operator-only diagnostic under central DP).
    """
    server_round = int(cfg["server-round"])
    device = pick_device(rc.device)
    received = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    metrics: dict[str, Any]
    if rc.privacy.mode in ("local", "central_local"):
        # Example-level DP-SGD; the client's ledger lives in its own store (clients/dp_sgd.py).
        dp_model, metrics = dp_sgd_round(rc, data, model, store, client_key=client_key, server_round=server_round,
                                         device=device)
        if dp_model is None:  # declined (over budget): the received model goes back unchanged
            trained = {k: v.copy() for k, v in received.items()}
        else:  # the plain module's arrays (no Opacus "_module." prefix)
            trained = {k: v.detach().cpu().numpy() for k, v in dp_model.state_dict().items()}
    else:
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
        metrics = {
            "num-examples": float(len(data.x_train)),
            "train_loss": stats["train_loss"],
        }
        trained = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if "clip-norm" in cfg:
        trained, metrics["unclipped"] = clip_update_on_client(received, trained, float(cfg["clip-norm"]))
    return trained, metrics
