"""Federated analytics with the Laplace mechanism: bounded per-client sums, noised by a trusted server.

``analytics=central`` (with ``privacy=none`` or ``central``; the server is trusted, the unit is a
client under add/remove-one, as for central DP):

* before training, the label distribution across the federation: every client's label counts
  normalised to sum 1 (L1 sensitivity 1), summed and released once with Laplace noise of scale
  ``1 / analytics.epsilon_label_histogram`` on each class;
* every ``analytics.validation_every`` rounds, the validation accuracy of the round's incoming
  global model on the sampled clients' own held-out rows: the sum of their accuracies (each in
  [0, 1]) and their count, released with Laplace noise of scale ``2 / analytics.epsilon_validation``
  on each (L1 sensitivity 2); the published figure is noisy sum / noisy count, clipped to [0, 1].

Each release is recorded in this object's :class:`~fedpriv.privacy.PrivacyLedger` (label,
mechanism, sensitivity, scale) before its noisy value exists; privacy.json lists every release and
the run's total epsilon composes them with central DP's training releases (no amplification by
sampling is claimed for them: :mod:`fedpriv.privacy.accounting`). A release happens whenever it is
due, whatever the replies (an empty round releases noise), so whether it happens reveals nothing.

The RAW per-round validation sums stay on the server (memory and checkpoint, never published):
:meth:`FederatedAnalytics.raw_validation_sums` is for private model selection over rounds, which
must account its own release (:meth:`FederatedAnalytics.ledger`'s ``record_pure_dp``).

``analytics=local`` (with ``privacy=local``; the server is not trusted, the unit is an example): the
same two figures, but each client adds the Laplace noise to its own label counts and its own count
of correct predictions and charges its own DP-SGD ledger first (:mod:`clients.analytics`); the server
only sums noisy figures (post-processing), holds no raw sums and records nothing in a ledger.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

from fedpriv.config import RunConfig
from fedpriv.engine import Population, RoundResult, RunState
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.privacy.laplace import LaplaceMechanism
from fedpriv.privacy.local_plan import budget_words

log = logging.getLogger("fedpriv")

QUERY_KEY = "analytics-query"  # a message's config key naming an analytics query (no training)
HISTOGRAM_LABEL = "label histogram"
VALIDATION_LABEL = "validation accuracy"
HISTOGRAM_SENSITIVITY = 1.0  # L1: one client's normalised label counts
VALIDATION_SENSITIVITY = 2.0  # L1: one client's accuracy in [0, 1] plus 1 to the count
PUBLISHED_KEY = "analytics_val_accuracy"


@dataclass
class ValidationSum:
    """Bounded validation contributions summed (a worker's share, or one client)."""

    accuracy_sum: float = 0.0
    clients: int = 0

    def add(self, accuracy: float, counted: int) -> None:
        self.accuracy_sum += min(1.0, max(0.0, float(accuracy))) if counted else 0.0
        self.clients += int(counted)


def validation_due(rc: RunConfig, server_round: int) -> bool:
    """Whether round ``server_round`` releases the validation accuracy (clients and server agree)."""
    an = rc.analytics
    return an.mode != "none" and an.epsilon_validation is not None and server_round % an.validation_every == 0


def _reply_size(reply: Message) -> int:
    """How many clients a (successful) reply speaks for: a worker's share, or one client."""
    m = reply.content["metrics"]
    if "clients-trained" in m:
        return sum(int(m[k]) for k in ("clients-trained", "clients-declined", "clients-failed", "clients-rejected"))
    return 1


def checked_validation(reply: Message, local: bool = False) -> tuple[float, int] | None:
    """A reply's (accuracy sum, clients), or None when absent or out of its bounds (then left out).
    ``local``: (noisy correct predictions, held-out rows), already private: only sanity checks."""
    try:
        if "analytics" not in reply.content:
            return None
        a = reply.content["analytics"]
        n, size = int(a["val-clients"]), _reply_size(reply)
        if local:
            total, rows = float(a["val-correct-noisy"]), int(a["val-rows"])
            return (total, rows) if 0 <= n <= size and rows >= 0 and math.isfinite(total) else None
        total = float(a["val-acc-sum"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (0 <= n <= size and math.isfinite(total) and -1e-9 <= total <= n + 1e-9):
        return None
    return min(max(total, 0.0), float(n)), n


def checked_histogram(reply: Message, asked: int, classes: int, local: bool = False) -> tuple[np.ndarray, int] | None:
    """A reply's (sum of label distributions, clients answered), or None when out of bounds;
    ``local``: a sum of noisy counts (already private), only its shape and finiteness are checked."""
    try:
        a = reply.content["analytics"]
        vec = np.asarray(list(a["label-sum"]), dtype=np.float64)
        n = int(a["clients-answered"])
    except (KeyError, TypeError, ValueError):
        return None
    if vec.shape != (classes,) or not np.all(np.isfinite(vec)) or not 0 <= n <= asked:
        return None
    if local:
        return vec, n
    if vec.min() < -1e-9:
        return None
    if vec.sum() > n * (1 + 1e-9):
        return None
    return np.clip(vec, 0.0, None), n


class FederatedAnalytics:
    """The server's side of federated analytics: queries, noise, the analytics ledger (a callback).

    Args (privacy meaning):
        rc: ``analytics.*`` (each release's epsilon and the cadence), ``privacy.secure_rng`` (the
            noise source: OpenDP's CSPRNG, or a seeded numpy stream NOT for release) and the data
            set's number of classes (public).
    """

    def __init__(self, rc: RunConfig, num_classes: int):
        self.rc = rc
        self.local = rc.analytics.mode == "local"  # clients noise their own figures (their own ledgers)
        self.num_classes = int(num_classes)
        secure = rc.privacy.secure_rng if rc.privacy.mode != "none" else True
        self.mechanism = LaplaceMechanism(secure=secure, seed=rc.seed + 15_485_863)
        self.ledger = PrivacyLedger()  # unit: a client, add/remove-one; pure releases only (plus selections)
        self.histogram: dict[str, Any] | None = None
        self._raw: dict[int, tuple[float, int]] = {}
        self._released: dict[int, float] = {}

    # -- the figures ---------------------------------------------------------------------------
    def raw_validation_sums(self) -> dict[int, tuple[float, int]]:
        """RAW (accuracy sum, clients) per validated round: server-side only, never published."""
        return dict(self._raw)

    def released_validation(self) -> dict[int, float]:
        """The published (noisy) validation accuracy per validated round."""
        return dict(self._released)

    def covered_metric_keys(self) -> tuple[str, ...]:
        return (PUBLISHED_KEY,)

    # -- before training -----------------------------------------------------------------------
    def before_training(self, population: Population, arrays: Any, client_config: dict[str, Any]) -> None:
        """Release the label histogram once (not again on resume: the checkpoint holds it)."""
        eps = self.rc.analytics.epsilon_label_histogram
        if eps is None or self.histogram is not None:
            return
        clients = list(range(self.rc.num_clients))
        if not population.uses_shares:
            clients = [c for c in clients if c < len(population.nodes)]
        messages = population.messages(clients, 0, arrays, {**client_config, QUERY_KEY: "label-histogram"})
        sizes = {int(m.metadata.dst_node_id): n for m, n in messages}
        replies, _ = population.dispatch(messages)
        total = np.zeros(self.num_classes)
        for r in replies:
            if r.has_error():
                continue
            checked = checked_histogram(r, sizes.get(int(r.metadata.src_node_id), 1), self.num_classes, self.local)
            if checked is None:
                log.warning("a malformed label-histogram reply was left out")
                continue
            total += checked[0]
        noisy = total if self.local else self.mechanism.release(  # local: the clients' noise is in already
            total, sensitivity=HISTOGRAM_SENSITIVITY, epsilon=float(eps), ledger=self.ledger, label=HISTOGRAM_LABEL,
            stream=0)
        clipped = np.clip(noisy, 0.0, None)
        dist = clipped / clipped.sum() if clipped.sum() > 0 else np.full(self.num_classes, 1.0 / self.num_classes)
        self.histogram = {"noisy_sum": noisy.tolist(), "distribution": dist.tolist()}

    # -- the callback ----------------------------------------------------------------------------
    def on_start(self, state: RunState) -> None:
        if state.checkpoint is not None and state.checkpoint.get("analytics"):
            self.load_state_dict(state.checkpoint["analytics"])

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        rnd = result.server_round
        if not validation_due(self.rc, rnd):
            return False
        total, n = 0.0, 0
        for reply in result.replies:
            checked = checked_validation(reply, self.local)
            if checked is not None:
                total, n = total + checked[0], n + checked[1]
        if self.local:  # noisy correct predictions over held-out rows (public): post-processing only
            self._released[rnd] = float(min(1.0, max(0.0, total / max(n, 1))))
            result.record[PUBLISHED_KEY] = self._released[rnd]
            return False
        self._raw[rnd] = (total, n)
        noisy = self.mechanism.release([total, float(n)], sensitivity=VALIDATION_SENSITIVITY,
                                       epsilon=float(self.rc.analytics.epsilon_validation), ledger=self.ledger,
                                       label=VALIDATION_LABEL, stream=rnd)
        self._released[rnd] = float(min(1.0, max(0.0, noisy[0] / max(noisy[1], 1.0))))
        result.record[PUBLISHED_KEY] = self._released[rnd]
        return False

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        if self.histogram is not None:
            summary["label_distribution"] = self.histogram["distribution"]

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "histogram": self.histogram,
                "raw": [[r, s, n] for r, (s, n) in sorted(self._raw.items())],
                "released": [[r, v] for r, v in sorted(self._released.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"])
        self.histogram = state.get("histogram")
        self._raw = {int(r): (float(s), int(n)) for r, s, n in state.get("raw", [])}
        self._released = {int(r): float(v) for r, v in state.get("released", [])}

    # -- privacy.json -------------------------------------------------------------------------------
    def section(self) -> dict[str, Any]:
        """privacy.json's ``analytics`` part: the bounds, every release, the noisy figures."""
        return {
            "unit": "user (client), add/remove-one; a trusted server adds the noise to the bounded sums",
            "mechanism": "Laplace (pure DP)",
            "noise": self.mechanism.words(),
            "contribution_bounds": {
                HISTOGRAM_LABEL: "a client's label counts over all its rows, normalised to sum 1: L1 sensitivity 1",
                VALIDATION_LABEL: "a sampled client's accuracy of the round's incoming model on its own held-out rows, "
                                  "in [0, 1], plus 1 to a count: L1 sensitivity 2 (no amplification by sampling claimed)",
            },
            "releases": self.ledger.releases_table(),
            "epsilon": self.ledger.epsilon(0.0),  # pure DP: the exact sum at delta 0
            "delta": 0.0,
            "label_distribution": None if self.histogram is None else self.histogram["distribution"],
            "label_noisy_sum": None if self.histogram is None else self.histogram["noisy_sum"],
            "validation_accuracy": {str(r): v for r, v in sorted(self._released.items())},
        }

    def extend_report(self, report: dict[str, Any] | None) -> dict[str, Any]:
        """privacy.json with the analytics releases in it, and the run's total epsilon over all of them.

        With central DP the analytics releases join the training releases in one ledger (same unit,
        relation, delta and accountant): ``epsilon`` becomes the total, ``epsilon_training`` keeps the
        training alone (the per-round ``epsilon`` in metrics.jsonl), ``events`` lists every release.
        Without central DP the training has no guarantee: the run's epsilon is inf, and the analytics
        releases alone are (epsilon, 0)-DP.
        """
        if self.local:
            return self._extend_local(report)
        section = self.section()
        eps_a = section["epsilon"]
        if report is None:
            words = (f"Only the federated analytics releases listed under 'analytics' are covered: user-level "
                     f"(epsilon={eps_a:.4g}, delta=0)-DP under adding or removing one client, with a trusted server. "
                     "The training is NOT private (privacy=none): the model and the training metrics carry no "
                     "guarantee, so the run as a whole has epsilon = inf.")
            caveats = ["privacy=none: only the analytics releases are differentially private"]
            # summary: no run "epsilon" (the training has no guarantee); the analytics' own figure only
            return {"summary": {"analytics_epsilon": eps_a, "privacy_caveats": caveats},
                    "guarantee": words, "unit": "user (client)", "neighbouring_relation": "add_or_remove_one",
                    "epsilon": math.inf, "delta": 0.0, "analytics": section,
                    "events": self.ledger.state_dict()["events"], "caveats": caveats}
        report = dict(report)
        combined = PrivacyLedger.from_events(report.get("events", []))
        combined.extend(self.ledger)
        delta, accountant = float(report["delta"]), str(report["accountant"])
        total = combined.epsilon(delta, accountant)
        report["epsilon_training"] = report["epsilon"]
        report["epsilon"] = total
        report["epsilon_by_accountant"] = combined.epsilon_report(delta)
        report["events"] = combined.state_dict()["events"]
        if combined.neighboring_relation == "replace_one":  # fixed-size sampling: group privacy of size 2
            section["replace_one"] = ("the run is accounted under replace-one: each analytics release counts with "
                                      "twice its add/remove-one epsilon listed here")
        report["analytics"] = section
        report["guarantee"] = (f"{report['guarantee']} The run's total epsilon={total:.4g} (delta={delta:.3g}) also "
                               f"covers the federated analytics releases listed under 'analytics' (Laplace, pure DP; "
                               f"{eps_a:.4g} on their own), composed with the training by the same "
                               f"{accountant.upper()} accountant; the training alone: epsilon={report['epsilon_training']:.4g}.")
        summary = dict(report.get("summary", {}))
        summary.update({"epsilon": total, "epsilon_training": report["epsilon_training"], "analytics_epsilon": eps_a})
        report["summary"] = summary
        report["caveats"] = list(report.get("caveats", [])) + [
            "metrics.jsonl's per-round 'epsilon' (and the trackers') counts the training releases only; the run's "
            f"total with the analytics releases is privacy.json's and summary.json's 'epsilon' ({total:.4g})"]
        return report

    def _extend_local(self, report: dict[str, Any] | None) -> dict[str, Any]:
        """analytics=local: the releases are in each client's own ledger (example level); no new total."""
        an = self.rc.analytics
        rows = [{"label": label, "mechanism": "laplace", "sensitivity": 1.0, "scale": 1.0 / eps, "epsilon_each": eps,
                 "when": when} for label, eps, when in (
                    (HISTOGRAM_LABEL, an.epsilon_label_histogram, "once, before training"),
                    (VALIDATION_LABEL, an.epsilon_validation,
                     f"each participation in a validation round (every {an.validation_every} rounds)"))
                if eps is not None]
        section = {
            "unit": "example (zero-out), each client's own ledger: the same unit and ledger as its DP-SGD",
            "mechanism": "Laplace (pure DP), added by each client to its own figures before they leave it",
            "noise": self.mechanism.words(),  # the clients' sampler: the same secure_rng choice
            "contribution_bounds": {
                HISTOGRAM_LABEL: "a client's label counts: one example moves them by 1 in L1",
                VALIDATION_LABEL: "a client's number of correct predictions on its held-out rows: one example moves it "
                                  "by 1 (the number of held-out rows is public, like the number of training rows)",
            },
            "per_client_releases": rows,
            "epsilon": "in each client's own ledger: the per-client epsilons of the 'local' section include these "
                       "releases (the server's table from each client's next training reply on)",
            "label_distribution": None if self.histogram is None else self.histogram["distribution"],
            "label_noisy_sum": None if self.histogram is None else self.histogram["noisy_sum"],
            "validation_accuracy": {str(r): v for r, v in sorted(self._released.items())},
            "caveats": [budget_words(self.rc)],  # how each client split its budget (DP-SGD and these releases)
        }
        report = dict(report or {"summary": {}, "caveats": []})
        report["analytics"] = section
        return report
