"""What a run may publish, and what stays with the operator.

A run's *published* outputs (``metrics.jsonl``, ``summary.json``, ``privacy.json``, ``model.pt``
and the trackers such as wandb) may carry only figures covered by the run's guarantee or public
by construction. Everything else a round produces (how many clients were sampled, replied,
failed or declined, raw update-norm quantiles, the clipped fraction under fixed clipping, the
raw mean training loss, timings) is an *operator-only diagnostic*: it goes to
``operator_only/diagnostics.jsonl``, and to trackers only when ``tracking.operator_diagnostics``
is set (with a printed caveat).

The rule is an allow-list: a new metric is operator-only until someone states why it is covered.

* ``privacy=none``: no guarantee, everything is published.
* ``privacy=local``: every reply is a DP-SGD release or a figure computed from the client's row
  count and its ledger, public under the zero-out relation; the round's counts (who was sampled
  is not protected at the example level) and figures computed from the privatized replies are
  covered. Timings are operator-only.
* ``privacy=central`` / ``central_local``: the test-set evaluation of the released model, and the
  figures the central-DP aggregator declares covered (epsilon, planned epsilon, delta, noise
  multipliers, the clip norm it used, the noise std, and the clipped fraction only when it comes
  from the noised count of adaptive clipping). Counts of sampled / replying clients are not: they
  would reveal the sampling that the accountant's amplification assumes hidden.
"""

from __future__ import annotations

from typing import Any, Iterable

# Evaluation of the released model on the server's own test split: post-processing of a release.
ALWAYS_PUBLIC = ("round", "test_accuracy", "test_loss")
# Counts and figures from privatized replies: covered under privacy=local (see the docstring).
LOCAL_COVERED = ("num_clients", "num_sampled", "num_failed", "num_dropped", "clients_declined",
                 "local_epsilon_max", "local_epsilon_mean")
# Figures that stay raw in a published file, with why they are there: every caveat lists them.
RAW_STILL_PUBLISHED = {
    "summary.json wall_seconds": "the run's total wall time, which grows with how many clients trained",
}


def published_keys(mode: str, covered: Iterable[str]) -> set[str] | None:
    """The round-record keys a run may publish (``None``: all of them, a run without privacy)."""
    if mode == "none":
        return None
    keys = set(ALWAYS_PUBLIC) | set(covered)
    if mode == "local":
        keys |= set(LOCAL_COVERED)
    return keys


def split_round(record: dict[str, Any], mode: str, covered: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(published, operator-only) parts of one round's record; ``round`` is in both."""
    allowed = published_keys(mode, covered)
    if allowed is None:
        return dict(record), {}
    published = {k: v for k, v in record.items() if k in allowed}
    operator = {k: v for k, v in record.items() if k not in allowed}
    if operator:
        operator = {"round": record.get("round"), **operator}
    return published, operator


def raw_diagnostics_caveat(mode: str, operator_keys: Iterable[str], opt_in_trackers: bool) -> str:
    """The caveat that names every raw figure, where it goes, and the raw ones still published."""
    keys = sorted(set(operator_keys) - {"round"})
    where = "operator_only/diagnostics.jsonl" + (" and the trackers (tracking.operator_diagnostics=true)"
                                                 if opt_in_trackers else "")
    still = "; ".join(f"{name} ({why})" for name, why in RAW_STILL_PUBLISHED.items())
    return (
        f"raw per-round diagnostics not covered by the guarantee ({', '.join(keys) or 'none this run'}) go only to "
        f"{where}; the console's progress lines show some of them too. Raw figures still in a published file: {still}"
    )


def outputs_section(mode: str, published_round_keys: Iterable[str], opt_in_trackers: bool) -> dict[str, str]:
    """What each file of the run folder contains, for privacy.json."""
    keys = ", ".join(sorted(published_round_keys))
    private = mode != "none"
    return {
        "metrics.jsonl": f"published: one line per round with {keys}",
        "summary.json": "published: final accuracy and loss on the server's test split, rounds, stop reason, the "
                        "configuration's public settings, the privacy figures of this report, wall_seconds (raw)",
        "privacy.json": "published: this report",
        "model.pt": "published: the final model (a release covered by the guarantee)" if private
                    else "published: the final model",
        "config.yaml": "published: the run's configuration",
        "exposure.json": "published, only with exposure.secrets: the exposure of synthetic secrets planted in some "
                         "clients' rows, measured on model.pt (post-processing of the model and of the secrets)",
        "trackers": "published: what metrics.jsonl and summary.json hold"
                    + (", plus operator-only diagnostics (tracking.operator_diagnostics=true)" if opt_in_trackers else ""),
        "operator_only/": "OPERATOR ONLY, not covered by the guarantee: diagnostics.jsonl (raw per-round figures), "
                          "privacy_details.json (per-client tables that reveal participation), "
                          "anonymisation.json (with anonymisation: each client's k and l achieved, rows withheld, "
                          "information loss, re-identification risk), "
                          "simulated_client_state/ (the simulated clients' own ledgers), "
                          "selection.json and candidates/ (with selection: the candidate rounds' scores and models; "
                          "model.pt is the chosen one)",
        "simulate.log, .hydra/": "OPERATOR ONLY: Hydra's job log (fedpriv's log lines, which can name failed or "
                                 "rejected clients) and the composed configuration",
        "checkpoint.pt": "OPERATOR ONLY: the model, the strategy's and the ledgers' state and the last round's records, "
                         "to resume (with analytics=central also the RAW per-round validation sums); never any "
                         "random generator state of a run with privacy.secure_rng=true",
    }


# What scripts/assess_risk.py (fedpriv.risk) adds to privacy.json's ``outputs`` after the run.
RISK_OUTPUT = (
    "OPERATOR ONLY, not covered by the guarantee: the membership-inference figures of the released model "
    "(computed on the clients' private training rows); privacy.json's risk section holds only the ceilings "
    "implied by the published (epsilon, delta), unless the operator published the figures (--publish)"
)


def published_round_keys(history: list[dict[str, Any]]) -> set[str]:
    """Every key a published round record of this run carried."""
    keys: set[str] = set()
    for record in history:
        keys |= set(record)
    return keys


def annotate_report(report: dict[str, Any], mode: str, published: Iterable[str], operator: Iterable[str],
                    opt_in_trackers: bool) -> dict[str, Any]:
    """privacy.json with what each file holds (``outputs``) and the raw-diagnostics caveat, which
    also joins the summary's ``privacy_caveats``."""
    report = dict(report)
    caveat = raw_diagnostics_caveat(mode, operator, opt_in_trackers)
    report["caveats"] = list(report.get("caveats", [])) + [caveat]
    summary = dict(report.get("summary", {}))
    summary["privacy_caveats"] = list(summary.get("privacy_caveats", [])) + [caveat]
    report["summary"] = summary
    report["outputs"] = outputs_section(mode, published, opt_in_trackers)
    return report
