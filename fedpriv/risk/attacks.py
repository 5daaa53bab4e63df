"""Example-level membership inference attacks on a released model.

* **Loss threshold** (Yeom, Giacomelli, Fredrikson & Jha, CSF 2018): a row is called a member when
  the model's cross-entropy loss on it is low; score = -loss. Yeom et al.'s own rule puts the
  threshold at the mean training loss; the ROC sweeps every threshold.
* **LiRA, offline, fixed variance** (Carlini, Chien, Nasr, Song, Terzis & Tramer, S&P 2022, Sec. IV-C
  and VI): ``k`` reference models of the same architecture are trained *centrally* (not federated,
  no DP) on rows the target model never saw and that are never scored (the attacker's auxiliary
  data). For each scored row the statistic is the logit-scaled confidence of its true label,
  phi = log(p / (1 - p)); its mean over the reference models, mu_out(x), is what phi would be were x
  a non-member. With few reference models Carlini et al. use one variance for all rows; the score
  (phi_target(x) - mu_out(x)) / sigma_out is then a one-sided likelihood-ratio test of "x was
  trained on" (its ranking equals that of the Gaussian tail probability they report).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpriv.config import RunConfig
from fedpriv.language_model import batch_loss
from fedpriv.task import new_model


@torch.no_grad()
def per_example(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(cross-entropy loss, logit-scaled confidence of the true label) of every row."""
    model.eval()
    losses, confs = [], []
    for start in range(0, len(x), batch_size):
        xb = torch.tensor(np.asarray(x[start:start + batch_size]))
        yb = torch.tensor(np.asarray(y[start:start + batch_size])).long()
        logits = model(xb).double()
        losses.append(F.cross_entropy(logits, yb, reduction="none").numpy())
        true = logits.gather(1, yb[:, None]).squeeze(1)
        others = logits.scatter(1, yb[:, None], float("-inf"))
        confs.append((true - torch.logsumexp(others, dim=1)).numpy())  # log p - log(1 - p), stable
    return np.concatenate(losses), np.concatenate(confs)


def loss_scores(losses: np.ndarray) -> np.ndarray:
    """Larger = more likely a member."""
    return -np.asarray(losses, dtype=float)


def train_reference(rc: RunConfig, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> nn.Module:
    """One reference model: the run's architecture, fresh weights from ``seed``, plain SGD with the
    run's client recipe (learning rate, momentum, weight decay, batch size) for ``epochs`` epochs.

    Written here rather than reused from ``clients/`` (which the core may not import); it is a plain
    SGD loop with no privacy role: the reference models only calibrate the attack.
    """
    model = new_model(dataclasses.replace(rc, seed=seed))
    t = rc.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y)).long()  # copies: rows may be read-only
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=g)
        for start in range(0, len(yt), t.batch_size):
            idx = order[start:start + t.batch_size]
            opt.zero_grad()
            batch_loss(model(xt[idx]), xt[idx], yt[idx]).backward()
            opt.step()
    model.eval()
    return model


def lira_offline_scores(target_conf: np.ndarray, reference_confs: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Offline LiRA with one variance: ``reference_confs`` has one row per reference model."""
    ref = np.asarray(reference_confs, dtype=float)
    if ref.ndim != 2 or ref.shape[0] < 1 or ref.shape[1] != len(target_conf):
        raise ValueError("reference confidences must be (models, rows) with one column per scored row")
    mu = ref.mean(axis=0)
    k = ref.shape[0]
    # One variance for every row, pooled over rows (each row's mean estimated from its k models).
    sigma = float(np.sqrt(np.sum((ref - mu) ** 2) / (ref.shape[1] * (k - 1)))) if k > 1 else 0.0
    sigma = sigma if sigma > 0 else 1.0  # one model: no spread to estimate; the ranking is unchanged
    return (np.asarray(target_conf, dtype=float) - mu) / sigma, {"sigma_out": sigma}
