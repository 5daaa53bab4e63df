"""Which rows the released model was trained on (members) and which it never saw (non-members).

Members are the training rows of the clients that took part in at least one round. Who took part
is read, in this order, from

1. the clients' own DP-SGD ledgers as the server saw them (``local.clients`` in privacy.json under
   privacy=local, ``operator_only/privacy_details.json`` under central_local): clients that trained;
2. a replay of a *seeded* client sampler (non-private runs and ``privacy.secure_rng=false``), checked
   round by round against the cohort sizes the run recorded (``num_sampled`` in metrics.jsonl or
   operator_only/diagnostics.jsonl); a client sampled but failed counts as a member;
3. otherwise (central DP with a secure sampler: the cohorts are hidden by design, and nothing in the
   run folder records them) every client. A client that was never sampled then counts as a member
   although it never trained: its rows look like non-members, which can only *lower* the attack's
   figures (TPR measured ~ (1 - f) TPR + f FPR for a share f of such rows). The expected share,
   (1 - q)^T for sampling rate q over T rounds, is reported beside the figures.

Non-members: the data set's test split (the server evaluates on it, never trains), every client's
validation rows (``data.val_fraction``: no client trains on them) and, when who took part is known,
the training rows of the clients that never did.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv import run_folder
from fedpriv.config import RunConfig
from fedpriv.sampling import ClientSampler
from fedpriv.task import ClientData, EmptyPartition, dataset_for, load_client_data


@dataclass
class Participation:
    """Who took part, and how that is known. ``clients`` is None when it is not known."""

    clients: set[int] | None
    source: str
    expected_never_sampled_fraction: float = 0.0


@dataclass
class MembershipRows:
    x_members: np.ndarray
    y_members: np.ndarray
    x_nonmembers: np.ndarray
    y_nonmembers: np.ndarray
    participation: Participation
    nonmember_sources: dict[str, int]


def _client_number(key: Any) -> int | None:
    m = re.fullmatch(r"client-(\d+)", str(key))
    return int(m.group(1)) if m else None


def from_local_ledgers(run_dir: Path, report: dict[str, Any] | None) -> Participation | None:
    """Clients that trained at least one round, from the local-DP monitor's table."""
    tables = []
    if report and isinstance(report.get("local"), dict):
        tables.append(report["local"].get("clients"))
    details = run_dir / run_folder.PRIVACY_DETAILS
    if details.exists():
        tables.append((json.loads(details.read_text()).get("local") or {}).get("clients"))
    for table in tables:
        if not table:
            continue
        ids = {_client_number(r.get("client_id")): int(r.get("rounds_participated", 0)) for r in table}
        if None in ids:
            return None  # clients named by node keys (deployment): not mapped to partitions here
        return Participation({cid for cid, n in ids.items() if n > 0 and cid is not None},
                             "exact: the clients' DP-SGD ledgers as the server saw them (trained at least one round)")
    return None


def recorded_cohort_sizes(run_dir: Path) -> dict[int, int]:
    """``num_sampled`` per round from the published metrics or the operator-only diagnostics."""
    sizes: dict[int, int] = {}
    for name in (run_folder.METRICS, run_folder.DIAGNOSTICS):
        for record in run_folder.read_jsonl(run_dir / name):
            if "num_sampled" in record and "round" in record:
                sizes[int(record["round"])] = int(record["num_sampled"])
    return sizes


def from_seeded_sampler(rc: RunConfig, run_dir: Path, rounds: int, sampler_seed: int | None) -> Participation | None:
    """Replay a seeded sampler; None when it is not seeded or the replay disagrees with the run."""
    if sampler_seed is None or rounds <= 0:
        return None
    sizes = recorded_cohort_sizes(run_dir)
    if any(r not in sizes for r in range(1, rounds + 1)):
        return None
    sampler = ClientSampler(rc.sampling, rc.num_clients, rc.clients_per_round, sampler_seed, rc.cyclic_groups)
    clients: set[int] = set()
    for rnd in range(1, rounds + 1):
        cohort = sampler.sample(rnd)
        if len(cohort) != sizes[rnd]:
            return None
        clients |= {int(c) for c in cohort}
    return Participation(clients, f"exact: replay of the run's seeded client sampler over {rounds} rounds, "
                                  "checked against every round's recorded cohort size (sampled clients)")


def participation(rc: RunConfig, run_dir: Path, report: dict[str, Any] | None, rounds: int,
                  sampler_seed: int | None) -> Participation:
    """Who took part (see the module's docstring for the order of the sources)."""
    if rc.sampling == "all":
        return Participation(set(range(rc.num_clients)), "exact: sampling=all (every client every round)")
    known = from_local_ledgers(run_dir, report) or from_seeded_sampler(rc, run_dir, rounds, sampler_seed)
    if known is not None:
        return known
    q = min(1.0, rc.clients_per_round / rc.num_clients)
    return Participation(
        None,
        "unknown (the run's cohorts are hidden by its secure sampler and recorded nowhere): every client's "
        "training rows count as members; those of clients never sampled lower the attack's figures",
        expected_never_sampled_fraction=(1.0 - q) ** max(rounds, 0),
    )


def _client(rc: RunConfig, cid: int) -> ClientData | None:
    try:
        return load_client_data(rc, cid)
    except EmptyPartition:
        return None


def membership_rows(rc: RunConfig, part: Participation) -> MembershipRows:
    """Member and non-member rows of a simulated run (every client's rows are the operator's)."""
    xm, ym, xn, yn = [], [], [], []
    val_rows = absent_rows = 0
    for cid in range(rc.num_clients):
        d = _client(rc, cid)
        if d is None:
            continue
        xn.append(d.x_val)
        yn.append(d.y_val)
        val_rows += len(d.y_val)
        if part.clients is None or cid in part.clients:
            xm.append(d.x_train)
            ym.append(d.y_train)
        else:
            xn.append(d.x_train)
            yn.append(d.y_train)
            absent_rows += len(d.y_train)
    ds = dataset_for(rc)
    x_test, y_test = getattr(ds, "x_test", None), getattr(ds, "y_test", None)
    test_rows = 0
    if x_test is not None and y_test is not None:
        xn.append(np.asarray(x_test))
        yn.append(np.asarray(y_test))
        test_rows = len(y_test)
    if not xm:
        raise ValueError("no client took part: the model was trained on no rows")
    return MembershipRows(
        np.concatenate(xm), np.concatenate(ym), np.concatenate(xn), np.concatenate(yn), part,
        {"test_split": test_rows, "client_validation_rows": val_rows, "training_rows_of_absent_clients": absent_rows},
    )
