"""User-level membership inference: one score per user, from the loss on all of the user's rows.

For data sets whose clients are people (Sent140: one Twitter user each; Shakespeare: one role each),
the question a user asks is "can anyone tell that *my* data trained this model?", not "this one row".
The attack (the loss-threshold attack of Yeom et al. 2018, averaged over a user's rows, as in the
user-inference attacks of Kandpal et al. 2023 and the per-user scores of pfl-research's benchmarks):

* score(user) = - mean cross-entropy of the released model over the user's rows;
* members: the clients that took part (what :mod:`.membership` knows; every client when the cohorts
  are hidden, with the dilution it causes stated), scored on the rows they trained on;
* non-members: users the model never saw: the data set's held-out test users (Sent140 keeps whole
  users out of the clients) and, when who took part is known, the clients that never did.

The ceiling: a user-level guarantee (central DP: add or remove one client with all its rows) bounds
this test directly. An example-level guarantee (DP-SGD) covers a user of ``r`` rows only by group
privacy, ``(r eps, r e^((r-1) eps) delta)``, taken here at the largest scored user's ``r``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedpriv.config import RunConfig
from fedpriv.task import EmptyPartition, dataset_for, load_client_data

from .attacks import per_example
from .ceiling import Guarantee, ceilings
from .membership import Participation
from .metrics import attack_figures


def _group(g: Guarantee, rows: int) -> Guarantee:
    if not g.unit.startswith("example") or not math.isfinite(g.epsilon):
        return g
    eps = rows * g.epsilon
    delta = min(1.0, rows * math.exp(min(700.0, (rows - 1) * g.epsilon)) * g.delta)
    return Guarantee(g.name, f"user of up to {rows} rows (group privacy of: {g.unit})", eps, delta, g.source)


def user_scores(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """- mean loss per owner id (``owners``: an id per row, ids ``0..k-1`` each with a row)."""
    loss, _ = per_example(model, x, y)
    counts = np.bincount(owners)
    return -np.bincount(owners, weights=loss) / np.maximum(counts, 1)


def user_level_attack(rc: RunConfig, model: torch.nn.Module, part: Participation, guarantees: list[Guarantee],
                      fprs: tuple[float, ...], max_users: int, seed: int) -> dict[str, Any] | None:
    """The per-user loss attack, its figures and the ceilings that bound it; None without natural users."""
    ds = dataset_for(rc)
    if ds.natural_ids is None:
        return None
    rng = np.random.default_rng([seed, 7])
    members = sorted(part.clients) if part.clients is not None else list(range(rc.num_clients))
    never = sorted(set(range(rc.num_clients)) - set(members)) if part.clients is not None else []
    members = [int(c) for c in rng.permutation(members)[:max_users]]

    def rows_of(clients: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, ys, owners = [], [], []
        for k, cid in enumerate(clients):
            try:
                d = load_client_data(rc, cid)
            except EmptyPartition:
                continue
            xs.append(d.x_train)
            ys.append(d.y_train)
            owners.append(np.full(len(d.y_train), k))
        if not xs:
            return np.zeros((0, *ds.input_shape), ds.x_train.dtype), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(owners)

    xm, ym, om = rows_of(members)
    xn, yn, on = rows_of([int(c) for c in rng.permutation(never)[:max_users]])
    sources = {"clients that never took part": int(len(np.unique(on)))}
    if ds.test_user_ids is not None:  # whole users held out of the clients
        keep = rng.permutation(np.unique(ds.test_user_ids))[:max_users]
        sel = np.isin(ds.test_user_ids, keep)
        _, owners = np.unique(ds.test_user_ids[sel], return_inverse=True)
        shift = int(on.max()) + 1 if len(on) else 0
        xn, yn = np.concatenate([xn, ds.x_test[sel]]), np.concatenate([yn, ds.y_test[sel]])
        on = np.concatenate([on, owners + shift])
        sources["held-out test users"] = len(keep)
    if len(ym) == 0 or len(yn) == 0:
        return None
    _, om = np.unique(om, return_inverse=True)
    _, on = np.unique(on, return_inverse=True)
    sm, sn = user_scores(model, xm, ym, om), user_scores(model, xn, yn, on)
    figures = attack_figures(sm, sn, fprs)
    largest = int(max(np.bincount(om).max(), np.bincount(on).max()))
    figures.update(unit="user", nonmember_sources=sources, rows_per_user_max=largest,
                   ceilings=[ceilings(_group(g, largest), fprs) for g in guarantees])
    return figures
