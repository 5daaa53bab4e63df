"""A client's contributions to federated analytics (fedpriv.analytics), each bounded before it leaves.

``analytics=central``: two figures, summed over clients on a trusted server that adds Laplace noise
(user level):

* the label distribution: a client's label counts over all its rows normalised to sum 1 (a client
  without rows contributes zeros), so one client moves the sum by at most 1 in L1;
* the validation accuracy of the round's *incoming* global model on the client's own held-out rows,
  in [0, 1], with 1 added to a count (a client without held-out rows adds 0 to both): one client
  moves the pair (sum, count) by at most 2 in L1.

In simulation a worker sums its share's contributions (the worker belongs to the server's trust
domain, as for the clipped sum of updates); in deployment a SuperNode sends its own.

``analytics=local`` (privacy=local: the server is not trusted): each client adds Laplace noise itself
to its label counts and to its number of correct predictions on its held-out rows (example level,
zero-out: one row moves either by at most 1; the number of rows is public, as for DP-SGD), after
recording the release in its own DP-SGD ledger, durably, and only if its budget allows; the worker
only sums figures that are already noisy. The client's DP-SGD noise is calibrated with these releases
planned (label counts once, one validation release per participation where it is due:
:func:`fedpriv.privacy.local_plan.planned_analytics`), so that both fit in ``privacy.local.target_epsilon``.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn

from clients.identity import client_key
from fedpriv.analytics import HISTOGRAM_LABEL, QUERY_KEY, VALIDATION_LABEL, ValidationSum, validation_due
from fedpriv.client_state import ClientStateStore
from fedpriv.config import RunConfig
from fedpriv.privacy.laplace import LaplaceMechanism
from fedpriv.privacy.local import load_client_ledger, save_client_ledger
from fedpriv.task import ClientData, dataset_for, evaluate, load_client_data

log = logging.getLogger("fedpriv.client")

__all__ = ["label_distribution", "validation_contribution", "answer_query", "local_release", "ShareValidation"]


def label_distribution(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The client's label counts normalised to L1 norm 1 (zeros without rows); labels outside
    ``[0, num_classes)`` are ignored. The L1 norm of the result is at most 1: the sensitivity."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    labels = labels[(labels >= 0) & (labels < num_classes)]
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def validation_contribution(model: nn.Module, data: ClientData, batch_size: int = 1024) -> tuple[float, int]:
    """(accuracy clipped to [0, 1], 1) of ``model`` on the client's held-out rows; (0, 0) without any."""
    if len(data.x_val) == 0:
        return 0.0, 0
    _, accuracy = evaluate(model, data.x_val, data.y_val, batch_size=batch_size)
    return float(min(1.0, max(0.0, accuracy))), 1


def local_release(rc: RunConfig, store: ClientStateStore, key: str, values: Any, epsilon: float, label: str,
                  stream: int) -> np.ndarray | None:
    """analytics=local: ``values`` + Laplace(1 / epsilon) (example-level L1 sensitivity 1), recorded in the
    client's own ledger and saved BEFORE the noisy values are returned; None (nothing released, nothing
    recorded) when the release would take the client past ``privacy.local.target_epsilon``.

    store, key: the client's own state folder and stable identity (its DP-SGD ledger lives there).
    stream: which seeded stream draws the noise under ``privacy.secure_rng=false`` (NOT for release).
    """
    book = load_client_ledger(store, key)
    trial = book.ledger.copy()
    mechanism = LaplaceMechanism(secure=rc.privacy.secure_rng, seed=rc.seed * 1_000_003 + zlib.crc32(key.encode()))
    noisy = mechanism.release(values, sensitivity=1.0, epsilon=epsilon, ledger=trial, label=label, stream=stream)
    lo = rc.privacy.local
    if lo.target_epsilon is not None and trial.epsilon(lo.delta, rc.privacy.accountant) > lo.target_epsilon:
        log.info("client %s does not release its %s: over its budget", key, label)
        return None  # the noisy values are dropped: nothing left the client, nothing was spent
    book.ledger = trial
    save_client_ledger(store, book)
    return noisy


class ShareValidation:
    """A share's (or one client's) validation contributions for round ``server_round``, as the reply carries them.

    central: the sum of the clients' clipped accuracies and their count (raw; the server noises the sum);
    local: each client's noisy number of correct predictions (:func:`local_release`), summed, with the
    number of held-out rows (public) and of clients.
    """

    def __init__(self, rc: RunConfig, server_round: int, store: ClientStateStore | None = None):
        self.rc, self.round, self.store = rc, int(server_round), store
        self.due = validation_due(rc, self.round)
        self.total = ValidationSum()
        self.noisy_correct, self.rows = 0.0, 0

    def add(self, model: nn.Module, data: ClientData, key: str) -> None:
        """The incoming global model (``model``) on the client's held-out rows, before it trains."""
        if not self.due:
            return
        if self.rc.analytics.mode == "central":
            self.total.add(*validation_contribution(model, data))
            return
        n = len(data.x_val)
        if n == 0 or self.store is None:
            return
        _, accuracy = evaluate(model, data.x_val, data.y_val)
        noisy = local_release(self.rc, self.store, key, [round(accuracy * n)],
                              float(self.rc.analytics.epsilon_validation), VALIDATION_LABEL, self.round)
        if noisy is not None:
            self.noisy_correct, self.rows = self.noisy_correct + float(noisy[0]), self.rows + n
            self.total.clients += 1

    def record(self) -> MetricRecord:
        if self.rc.analytics.mode == "central":
            return MetricRecord({"val-acc-sum": float(self.total.accuracy_sum), "val-clients": int(self.total.clients)})
        return MetricRecord({"val-correct-noisy": self.noisy_correct, "val-rows": int(self.rows),
                             "val-clients": int(self.total.clients)})


def answer_query(rc: RunConfig, cfg: ConfigRecord, node_config: dict[str, Any],
                 store: ClientStateStore | None = None) -> RecordDict:
    """The reply to an analytics query (before training): the sum of the named clients' label
    distributions (central) or of their noisy label counts (local, charged to each client's ledger in
    ``store``), and how many answered. A client whose rows cannot be loaded adds nothing."""
    query = str(cfg[QUERY_KEY])
    if query != "label-histogram":
        raise ValueError(f"unknown analytics query {query!r}")
    ids = [int(c) for c in cfg["client-ids"]] if "client-ids" in cfg else [int(cfg["client-id"])]
    k = dataset_for(rc).num_classes
    total = np.zeros(k, dtype=np.float64)
    answered = 0
    local = rc.analytics.mode == "local"
    for cid in ids:
        try:
            key = client_key(rc.client_mode, cid, node_config)  # the same identity checks as a training round
            data = load_client_data(rc, cid, node_config)
            labels = np.concatenate([data.y_train, data.y_val])
            if not local:
                total += label_distribution(labels, k)
            else:
                counts = np.bincount(labels[(labels >= 0) & (labels < k)], minlength=k)
                noisy = local_release(rc, store, key, counts, float(rc.analytics.epsilon_label_histogram),
                                      HISTOGRAM_LABEL, 0)
                if noisy is None:
                    continue
                total += noisy
        except Exception as exc:  # noqa: BLE001 - a client without rows adds nothing; the others go on
            log.info("client %d did not answer the label histogram: %s: %s", cid, type(exc).__name__, exc)
            continue
        answered += 1
    return RecordDict({"analytics": MetricRecord({"label-sum": total.tolist(), "clients-answered": answered,
                                                  "clients-asked": len(ids)})})
