"""A worker's share of a round's cohort: its clients trained one after another, one reply.

In simulation a round sends each worker (a Flower node on a Ray actor) one message naming its share
of the sampled clients, the way pfl-research's workers do, instead of one message per client. The
worker trains each client as that client would (its own rows, its own DP-SGD ledger in its own
store) and combines the results into one reply:

* ``clipped-sum`` (central DP): each client's update (its model minus the received global model)
  is clipped to the round's clip norm ``C`` and the reply carries the *sum* of clipped updates, each
  client's unclipped bit (adaptive clipping) and raw norm (an operator-only diagnostic). That is
  exactly what the server would have summed from the clients' own replies, so the mechanism, its
  noise and its epsilon are unchanged; the server checks that the sum's norm is at most
  ``clients * C``. The worker belongs to the server's trust domain (it is the simulation).
* ``weighted-mean`` (no central DP): the share's mean model weighted by row counts, with the sum
  of row counts as ``num-examples``, so Flower's weighted FedAvg over shares is FedAvg over clients.

A client that fails (no rows, a model Opacus cannot train) or returns a non-finite or malformed
model is counted and left out; the others go on. Under local DP every client's report (trained or
declined) travels in the reply: keys in the ``clients`` record, figures as lists in ``local``.
With federated analytics (:mod:`clients.analytics`) a validation round also carries the share's
summed validation contributions (``analytics`` record), measured on the received model before training.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.analytics import ShareValidation
from clients.identity import client_key
from clients.local_update import local_update
from fedpriv import updates
from fedpriv.client_state import ClientStateStore
from fedpriv.config import RunConfig
from fedpriv.task import load_client_data, new_model

log = logging.getLogger("fedpriv.client")

LOCAL_FIELDS = ("num-examples", "local_epsilon", "local_steps", "local_noise_multiplier", "local_sample_rate",
                "local_rounds", "declined")


def train_share(rc: RunConfig, cfg: ConfigRecord, arrays: ArrayRecord, node_config: dict[str, Any],
                store: ClientStateStore) -> RecordDict:
    """Train the clients ``cfg["client-ids"]`` on the received model; combine as ``cfg["share"]``."""
    combine = str(cfg["share"])
    clip_norm = float(cfg["clip-norm"]) if combine == "clipped-sum" else 0.0
    received = {k: v.copy() for k, v in updates.from_record(arrays).items()}
    global_state = arrays.to_torch_state_dict()
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in received.items()}
    weight, trained, failed, declined, rejected = 0.0, 0, 0, 0, 0
    bits: list[float] = []
    norms: list[float] = []
    losses: list[float] = []
    keys: list[str] = []
    local: dict[str, list[float]] = {f: [] for f in LOCAL_FIELDS}
    model = new_model(rc)  # one model for the share, reset to the global model for every client
    validation = ShareValidation(rc, int(cfg["server-round"]), store)  # analytics, if due this round
    for cid in [int(c) for c in cfg["client-ids"]]:
        try:
            key = client_key(rc.client_mode, cid, node_config)
            data = load_client_data(rc, cid, node_config)
            model.load_state_dict(global_state)
            validation.add(model, data, key)  # the incoming global model on its held-out rows, before training
            new, metrics = local_update(rc, {"server-round": cfg["server-round"]}, data, model, store, key)
        except Exception as exc:  # noqa: BLE001 - one client's fault never cripples the share
            failed += 1
            log.info("client %d failed: %s: %s", cid, type(exc).__name__, exc)
            continue
        if "local_epsilon" in metrics:  # its ledger moved (or it declined): the server's table hears of it
            keys.append(key)
            for f in LOCAL_FIELDS:
                local[f].append(float(metrics[f]))
        if float(metrics.get("declined", 0.0)):
            declined += 1
            continue
        problem = updates.update_problem(new, received)
        if problem is not None:
            rejected += 1
            log.warning("client %d's model was rejected: %s", cid, problem)
            continue
        delta = updates.difference(new, received)
        if combine == "clipped-sum":
            clipped, norm, was_clipped = updates.clip(delta, clip_norm)
            total = updates.add(total, clipped)
            bits.append(0.0 if was_clipped else 1.0)
            norms.append(norm)
        else:
            n = float(metrics["num-examples"])
            total = {k: total[k] + n * new[k].astype(np.float64) for k in total}
            weight += n
        if "train_loss" in metrics:
            losses.append(float(metrics["train_loss"]))
        trained += 1
    if combine == "weighted-mean":
        total = ({k: (v / weight).astype(received[k].dtype) for k, v in total.items()} if weight > 0
                 else received)
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in total.items()}),
        "metrics": MetricRecord({
            "num-examples": weight if combine == "weighted-mean" else float(trained),
            "clients-trained": trained, "clients-failed": failed, "clients-declined": declined,
            "clients-rejected": rejected, "clipped-sum": 1.0 if combine == "clipped-sum" else 0.0,
        }),
        # Per aggregated client, in order: the unclipped bit (adaptive clipping), the raw update norm and
        # the raw training loss (the last two operator-only diagnostics).
        "diagnostics": MetricRecord({"unclipped": bits, "update-norms": norms, "train-losses": losses}),
    })
    if validation.due:
        content["analytics"] = validation.record()
    if keys:
        content["clients"] = ConfigRecord({"keys": keys})
        content["local"] = MetricRecord({f: v for f, v in local.items()})
    return content
