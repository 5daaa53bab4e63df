"""What a run says about anonymisation: every client's figures for the operator, and privacy.json's
section for everyone.

The per-client figures (k and l achieved, rows withheld, information loss, re-identification
risk before and after) are raw, data-dependent, and covered by no guarantee: they go only to
``operator_only/anonymisation.json``. The server computes them with the very function each client
runs on its own rows (:mod:`fedpriv.anonymisation.rows`), over the same partition; a SuperNode that
trains on its own ``data-path`` file is refused under anonymisation, so there is nothing else.
privacy.json's ``anonymisation`` section holds the configuration (public: chosen before any data
was seen) and what k-anonymity does and does not protect against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedpriv import run_folder
from fedpriv.anonymisation import hierarchy as hier
from fedpriv.anonymisation.rows import SENSITIVE, anonymised_table, raw_table
from fedpriv.config import ConfigError, RunConfig
from fedpriv.data import FederatedDataset, client_split
from fedpriv.errors import DataError
from fedpriv.task import client_partition, dataset_for

REPORT = f"{run_folder.OPERATOR_DIR}/anonymisation.json"

PROTECTS = ("linkage on the quasi-identifiers: every row a client trains on shares its quasi-identifier values "
            "with at least k-1 others of that client's table, so an outsider who knows a patient's quasi-identifiers "
            "cannot single out the patient's row")
DOES_NOT = (
    ("it is not differential privacy: no epsilon comes from it, and it says nothing about what the trained model "
     "reveals (a model can memorise a row's non-generalised columns; membership inference is outside it)"),
    ("background knowledge: an attacker who knows more than the quasi-identifiers (another column, or who else is "
     "in the table) is outside its model; the quasi-identifiers listed are a judgement, not a proof"),
)


def client_indices(rc: RunConfig, ds: FederatedDataset, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's training and validation rows, exactly as :func:`fedpriv.task.load_client_data` splits them."""
    idx = client_partition(rc, client_id)
    tr, va = client_split(idx, rc.data.val_fraction, rc.seed, client_id)
    return np.sort(tr), np.sort(va)


def client_reports(rc: RunConfig, ds: FederatedDataset | None = None) -> list[dict[str, Any]]:
    """Every client's figures (one anonymisation each); refuses (one line) a client that cannot be
    anonymised as configured, naming the client."""
    ds = ds if ds is not None else dataset_for(rc)
    table = raw_table(rc, ds)
    hier.check_config(rc.anonymisation, list(table.columns), SENSITIVE)
    reports = []
    for c in range(rc.num_clients):
        tr, va = client_indices(rc, ds, c)
        if len(tr) + len(va) == 0:
            continue
        try:
            released = anonymised_table(rc, ds, np.concatenate([tr, va]))
        except (ConfigError, DataError) as exc:
            raise type(exc)(f"{exc} (client {c}{_name(ds, rc, c)})") from None
        train_rows = int(np.sum(released.kept < len(tr)))
        reports.append({"client": c, "name": _name(ds, rc, c).strip(" ()") or None,
                        "training_rows_released": train_rows, **released.report})
    return reports


def _name(ds: FederatedDataset, rc: RunConfig, c: int) -> str:
    names = ds.natural_names if rc.partition.scheme == "natural" else None
    return f" ({names[c]})" if names and c < len(names) else ""


def check_anonymisation(rc: RunConfig, ds: FederatedDataset) -> np.ndarray:
    """Preflight: every client's table anonymises as configured; returns each client's training rows
    after anonymisation (what its DP-SGD plan will be computed from)."""
    return np.array([r["training_rows_released"] for r in client_reports(rc, ds)], dtype=int)


def write_operator_report(rc: RunConfig, run_dir: Path) -> None:
    """``operator_only/anonymisation.json``: every client's raw figures (not published)."""
    if not rc.anonymisation.enabled:
        return
    clients = client_reports(rc)
    run_folder.write_json(Path(run_dir) / REPORT, {
        "operator_only": "raw, data-dependent figures of each client's table, covered by no guarantee: do not publish",
        "computed_by": "the server, with the function every client runs on its own rows (fedpriv.anonymisation)",
        "definitions": {
            "k_achieved / l_achieved": "pycanon's k-anonymity and distinct l-diversity (of the target) of the "
                                       "released table",
            "rows_suppressed": "rows withheld (not trained on) because their class stayed smaller than k or "
                               "had fewer than l diagnoses",
            "information_loss.generalisation_intensity": "mean over QIs of level / top level (0 exact, 1 all '*')",
            "information_loss.discernibility_per_row": "pycanon's discernibility metric / rows: the mean number of "
                                                       "rows a row cannot be told apart from; a withheld row counts "
                                                       "the whole table",
            "risk.unique_fraction": "share of rows alone in their equivalence class (identified by the QIs alone)",
            "risk.prosecutor_max": "1 / smallest class: the most exposed row's chance of being singled out",
            "risk.prosecutor_mean": "mean over rows of 1 / class size",
            "risk.homogeneous_fraction": "share of rows whose class holds one diagnosis (attribute disclosure)",
        },
        "clients": clients,
    })


def privacy_section(rc: RunConfig) -> dict[str, Any]:
    """privacy.json's ``anonymisation`` section: the configuration and its meaning, no data-dependent figure."""
    cfg = rc.anonymisation
    caveats = list(DOES_NOT)
    if cfg.l_diversity:
        caveats.insert(1, f"attribute disclosure beyond distinct l-diversity: every class holds at least "
                          f"{cfg.l_diversity} diagnoses, but one may dominate it (skewness; t-closeness is not asked)")
    else:
        caveats.insert(1, "attribute disclosure: without l-diversity every row of an equivalence class may share the "
                          "diagnosis, so linking a patient to the class reveals it")
    if rc.privacy.mode in ("local", "central_local"):
        caveats.append("example-level DP-SGD covers the anonymised rows each client trains on, not the raw records: "
                       "one patient's record can change how other rows are generalised or withheld")
    if rc.privacy.mode in ("central", "central_local"):
        caveats.append("user-level central DP covers each client's whole contribution, whatever it did to its rows "
                       "first: the anonymisation neither weakens nor adds to that epsilon")
    return {
        "method": "k-anonymity" + (f" with distinct {cfg.l_diversity}-diversity of the target" if cfg.l_diversity
                                   else "") + ": full-domain generalisation and suppression (anjana), checked with "
                                              "pycanon, on each client's own rows before it trains",
        "k": cfg.k,
        "l_diversity": cfg.l_diversity,
        "sensitive_attribute": "the target (num > 0)" if rc.dataset.name == "heart_disease" else "the target",
        "max_suppression": cfg.max_suppression,
        "identifiers_removed": list(cfg.identifiers),
        "quasi_identifiers": {name: hier.describe(spec) for name, spec in hier.specs(cfg).items()},
        "guarantee": f"every client's released table is {cfg.k}-anonymous" + (
            f" and {cfg.l_diversity}-diverse" if cfg.l_diversity else "") + " on these quasi-identifiers, "
            "or the client does not train (checked before release)",
        "protects_against": PROTECTS,
        "does_not_protect_against": caveats,
        "operator_only": f"{REPORT}: each client's k and l achieved, rows withheld, information loss and "
                         f"re-identification risk before and after (raw figures)",
    }


def extend_report(report: dict[str, Any] | None, rc: RunConfig) -> dict[str, Any] | None:
    """The run's privacy report with the ``anonymisation`` section (a report is made if there was none)."""
    if not rc.anonymisation.enabled:
        return report
    report = dict(report) if report is not None else {"mode": rc.privacy.mode}
    report["anonymisation"] = privacy_section(rc)
    summary = dict(report.get("summary", {}))
    summary["privacy_caveats"] = list(summary.get("privacy_caveats", [])) + [
        (f"anonymisation: k-anonymity (k={rc.anonymisation.k}) of each client's rows protects against linkage on "
         f"the quasi-identifiers; it is not differential privacy")]
    if rc.privacy.mode == "local":  # the DP-SGD table publishes q = 1/ceil(n/B) and steps per client
        summary["privacy_caveats"].append(
            "anonymisation under privacy=local: privacy.json's per-client DP-SGD figures (sample_rate, steps) "
            "reveal each client's training rows after suppression, hence roughly its rows withheld; the DP-SGD "
            "relation (zero-out) treats a client's row count as public")
    report["summary"] = summary
    return report
