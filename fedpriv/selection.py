"""Which round's global model a run ships (``model.pt``): the last one, or the best by the clients'
validation accuracy, chosen privately (``selection.method``).

Candidates: the global models that the federated analytics validated (:mod:`fedpriv.analytics`:
in round ``r`` the sampled clients score the model they received, the one *after round r - 1*, on
their own held-out rows). Each candidate's weights are kept on disk under
``operator_only/candidates/`` (operator-only: no one may see a model before it is chosen); the
model after the last round is never validated, so it is not a candidate.

* ``last`` -- ship the last model (no selection, nothing to account).
* ``noisy_max`` -- trusted server (analytics on the server): the exponential mechanism
  (:mod:`fedpriv.privacy.selection`, report-noisy-max with Gumbel noise) over the RAW per-round
  validation sums. Utility of the model validated in round r: ``-(n_r - S_r)``, minus the summed
  validation error of that round's validating clients (S_r: their accuracies, each in [0, 1];
  n_r: how many). Conditioned on the released models (adaptive composition), adding one client
  lowers each score by its own error in [0, 1] in the rounds it validated and leaves the others:
  sensitivity 1, every score moves the same way (monotone), so the factor 2 is dropped under
  add/remove-one; a replace-one ledger doubles the charge itself (group privacy). The cost,
  ``selection.epsilon``, is recorded in the analytics ledger (``record_pure_dp``), so the run's
  total epsilon in ``privacy.json`` includes it. Composing it unamplified with the sampled training is
  valid although both depend on the same hidden cohorts: given every released training output, the
  selection's law under D + x is a mixture, over x's inclusion pattern, of laws each within e^eps of
  its law under D (monotone scores for every fixed pattern), hence itself within e^eps; so the run is
  an adaptive composition of the training and validation releases (as accounted) and an epsilon-DP
  step. Known bias: a round with more validating clients accumulates more error (Poisson cohorts
  vary), which favours rounds with smaller cohorts.
* ``released_argmax`` -- the round whose *released* (Laplace-noised) validation accuracy is highest:
  post-processing of figures already paid for, no additional privacy cost. The only choice when the
  server is not trusted (``analytics=local``: the clients noise their own figures, so the server never
  holds raw sums).

The decision is written durably (``operator_only/selection.json``, with the raw scores) before
anything about it is published; a resumed run that reaches the end again reuses it instead of
drawing again (a second draw would be a second release). A run stopped by Ctrl-C (``stop_reason``
"interrupted") is not over: it draws nothing, ships its last model, and a resumed run selects at its
own end among every validated round.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord

from fedpriv import run_folder
from fedpriv.analytics import FederatedAnalytics, validation_due
from fedpriv.config import RunConfig
from fedpriv.durable import durable_write
from fedpriv.engine import RoundResult, RunState
from fedpriv.errors import RunFolderError
from fedpriv.privacy.selection import MECHANISM, report_noisy_max

log = logging.getLogger("fedpriv")

METHODS = ("last", "noisy_max", "released_argmax")
CANDIDATES_DIR = f"{run_folder.OPERATOR_DIR}/candidates"
DECISION = f"{run_folder.OPERATOR_DIR}/selection.json"  # the raw scores and the winner: operator-only
LEDGER_LABEL = "model selection"
UTILITY = ("minus the summed validation error of the round's validating clients (sum over them of 1 - accuracy "
           "of the model they received, on their own held-out rows)")


def candidate_path(run_dir: str | Path, after_round: int) -> Path:
    """Where the global model after ``after_round`` rounds (0: the initial model) is kept."""
    return Path(run_dir) / CANDIDATES_DIR / f"model_after_round_{after_round}.pt"


class ModelSelection:
    """A callback (after the analytics, before Disclosure and Checkpointing): keeps the candidates,
    selects at the end, swaps the shipped model into the run state and reports.

    Args (privacy meaning):
        rc: ``selection.method`` (last | noisy_max | released_argmax) and ``selection.epsilon``
            (the pure-DP cost of one noisy_max selection, user-level, add/remove-one client).
        analytics: the run's federated analytics: its RAW validation sums (server-side only) feed
            noisy_max, its released figures feed released_argmax, its ledger takes the charge.
        evaluate: the server's evaluation of a model on its own test split (public by construction).
    """

    def __init__(self, rc: RunConfig, analytics: FederatedAnalytics,
                 evaluate: Callable[[ArrayRecord], tuple[float, float]]):
        self.rc, self.analytics, self.evaluate = rc, analytics, evaluate
        self.decision: dict[str, Any] | None = None
        self.deferred = False  # an interrupted run: the resumed run selects (nothing drawn, nothing charged)

    # -- candidates ------------------------------------------------------------------------------
    def _keep(self, state: RunState, after_round: int) -> None:
        path = candidate_path(state.run_dir, after_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = state.arrays.to_torch_state_dict()
        durable_write(path, lambda f: torch.save(weights, f))

    def on_start(self, state: RunState) -> None:
        if state.checkpoint is None and validation_due(self.rc, 1):
            self._keep(state, 0)  # round 1 validates the initial model

    def after_round(self, state: RunState, result: RoundResult) -> bool:
        t = result.server_round
        if t < self.rc.num_rounds and validation_due(self.rc, t + 1):
            self._keep(state, t)  # before Checkpointing records round t: a resume finds it
        return False

    # -- the choice ------------------------------------------------------------------------------
    def _candidates(self, state: RunState, figures: dict[int, Any]) -> dict[int, Any]:
        """Validated round -> its figure, for rounds whose model is on disk."""
        kept = {r: v for r, v in sorted(figures.items()) if candidate_path(state.run_dir, r - 1).exists()}
        if len(kept) < len(figures):
            log.warning("selection: %d validated round(s) have no kept model and are not candidates",
                        len(figures) - len(kept))
        return kept

    def _decide(self, state: RunState) -> dict[str, Any]:
        method = self.rc.selection.method
        if method == "noisy_max":  # the RAW sums: a trusted server's (analytics=central)
            candidates = self._candidates(state, self.analytics.raw_validation_sums())
        else:  # the RELEASED figures: post-processing
            candidates = self._candidates(state, self.analytics.released_validation())
        rounds = list(candidates)
        decision: dict[str, Any] = {"method": method, "validated_rounds": rounds}
        if not rounds:
            return decision | {"winner_round": None}
        if method == "noisy_max" and len(rounds) == 1:  # a constant output: nothing to hide, nothing charged
            return decision | {"winner_round": rounds[0]}
        if method == "noisy_max":
            scores = [s - n for s, n in candidates.values()]  # -(summed error); see the module docstring
            sel = report_noisy_max(scores, float(self.rc.selection.epsilon), 1.0, monotone=True)
            return decision | {"winner_round": rounds[sel.index], "raw_scores": scores, "mechanism": sel.as_dict()}
        values = list(candidates.values())
        best = max(range(len(rounds)), key=values.__getitem__)  # ties: the earliest round
        return decision | {"winner_round": rounds[best], "released_scores": values}

    def on_end(self, state: RunState, summary: dict[str, Any]) -> None:
        path = state.run_dir / DECISION
        if path.exists():  # this run already chose (then stopped before the end): never draw twice
            self.decision = _read(path)
        elif state.stop_reason == "interrupted":  # not the end: a resumed run selects among all its rounds
            self.deferred = True
            log.warning("selection: the run was interrupted; nothing drawn, the last model is shipped for now")
            return
        else:
            self.decision = self._decide(state)
            run_folder.write_json(path, self.decision)
        d = self.decision
        if "mechanism" in d:  # noisy_max drew among several candidates: charge it
            self.analytics.ledger.record_pure_dp(float(self.rc.selection.epsilon), label=LEDGER_LABEL,
                                                 mechanism=MECHANISM)
        if d["winner_round"] is None:
            log.warning("selection: no validated round; shipping the last model")
            return
        shipped = d["winner_round"] - 1
        weights = torch.load(candidate_path(state.run_dir, shipped), map_location="cpu", weights_only=True)
        last = (summary.get("final_loss"), summary.get("final_accuracy"))
        state.arrays = ArrayRecord(weights)  # Checkpointing.on_end writes model.pt from it
        loss, accuracy = self.evaluate(state.arrays)
        summary.update({"shipped_model_after_round": shipped, "final_loss": loss, "final_accuracy": accuracy,
                        "last_model_loss": last[0], "last_model_accuracy": last[1]})

    # -- privacy.json ----------------------------------------------------------------------------
    def extend_report(self, report: dict[str, Any] | None) -> dict[str, Any] | None:
        """privacy.json with a ``selection`` section (the method, candidates, cost and the winner)."""
        if report is not None and self.deferred:
            return {**report, "selection": {
                "method": self.rc.selection.method, "epsilon": 0.0, "delta": 0.0,
                "deferred": "the run was interrupted before its last round: nothing was drawn nor charged and model.pt "
                            "is the last model; a resumed run selects once, at its end, among every validated round"}}
        if report is None or self.decision is None:
            return report
        d = self.decision
        section: dict[str, Any] = {
            "method": d["method"],
            "chooses": "which round's global model is shipped as model.pt",
            "candidates_model_after_round": [r - 1 for r in d["validated_rounds"]],
            "selected_model_after_round": None if d["winner_round"] is None else d["winner_round"] - 1,
            "published": ("the winner only (it is the mechanism's output); the candidates' scores and weights are "
                          f"operator-only ({DECISION}, {CANDIDATES_DIR}/)"),
        }
        if d["method"] == "noisy_max":
            mech = d.get("mechanism") or {}
            section.update({
                "epsilon": float(self.rc.selection.epsilon) if "mechanism" in d else 0.0, "delta": 0.0,
                "mechanism": MECHANISM if "mechanism" in d else "none: a single candidate (a constant output)",
                "utility": UTILITY, "sensitivity": 1.0, "monotone": True, "gumbel_scale": mech.get("gumbel_scale"),
                "why_monotone": ("adding a client can only lower every round's score (by its own error in [0, 1]) "
                                 "given the released models, so the exponential mechanism needs exp(eps u / Delta), "
                                 "not exp(eps u / (2 Delta)); under replace-one the ledger doubles the charge"),
                "accounted": (f"recorded in the analytics ledger as the pure-DP release '{LEDGER_LABEL}'; the run's "
                              "total epsilon includes it") if "mechanism" in d else
                             "nothing: with one candidate the output does not depend on the data",
                "randomness": "OpenDP make_noisy_max: exact Gumbel sampling from OpenSSL's CSPRNG",
            })
        elif d["method"] == "released_argmax":
            paid = ("in each client's own ledger (analytics=local: every client noised its own figures)"
                    if self.rc.analytics.mode == "local" else "in the analytics releases")
            section.update({"epsilon": 0.0, "delta": 0.0,
                            "accounted": ("post-processing: the argmax of the released (Laplace-noised) validation "
                                          f"accuracies, already paid for {paid}; no additional cost")})
        return {**report, "selection": section}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunFolderError(f"{path} is unreadable; the run's selection cannot be replayed") from None
