"""The server's view of local (example-level) DP: what clients report about their own ledgers.

Under ``privacy.mode`` local / central_local every client runs DP-SGD and keeps its own ledger
(:mod:`clients.dp_sgd`); the guarantee is computed and enforced by the client, so the server needs
no trust for it. Each reply carries the client's epsilon after the round (``local_epsilon``, also on
a declined round), rounds trained (``local_rounds``), the round's DP-SGD steps, noise multiplier and
sampling rate, and the client's stable key (a ``client`` record, :mod:`clients.identity`).
:class:`LocalPrivacyMonitor` collects them into

* per-round metrics ``local_epsilon_max`` / ``local_epsilon_mean`` over every client heard from so
  far (its latest figure): the privacy spent up to that round;
* summary keys and the ``local`` section of ``privacy.json``: the guarantee in words and, where
  it may be published, a per-client table.

What may be published depends on the run. Under ``privacy=local`` the per-client figures depend
only on row counts and on which rounds a client took part in, both public under the zero-out
relation the epsilon holds under, so the table is published. Under ``central_local`` the same
table would tell who was sampled in which round and how many rows each client holds, which the
central (user-level) guarantee hides (publishing who was sampled forfeits the amplification by
sampling): the table, the max and the mean go to the operator-only report, and the published
section states the bound every client enforces itself (``privacy.local.target_epsilon``).

It also checks what the server can check: that a client's ledger counts at least the rounds the
server saw it train (a lost ledger would under-count; the client's figure is then replaced by one
recomputed from the releases the server saw), and that ``privacy.local.delta`` is below ``1/n``
for every client's ``n`` rows.

A round costs time in the clients heard from in it, not in every client seen so far: each client's
figure is cached and recomputed only when the client reports, the max and mean are kept running
(exactly: :class:`fedpriv.privacy.running.RunningFigures`), and in a run the table lives in an
append-only journal, ``operator_only/local_monitor.jsonl`` (operator-only: under central_local it
tells who was sampled when), to which each round's reports are appended and fsynced before the
round is checkpointed or published; the checkpoint holds a reference (round, line count), and a
resumed run replays the journal up to the checkpoint's round, dropping any later line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fedpriv import run_folder
from fedpriv.config import RunConfig
from fedpriv.durable import durable_write_text
from fedpriv.errors import RunFolderError

from .ledger import PrivacyLedger
from .running import RunningFigures

# Per-reply keys that Flower's metric averaging turns into meaningless averages (declined replies
# are never aggregated, so "declined" would always average to 0; clients_declined counts them).
_UNAVERAGEABLE = ("local_rounds", "local_epsilon", "declined", "local_steps", "local_noise_multiplier",
                  "local_sample_rate")


@dataclass
class ClientEntry:
    client_id: str  # the client's stable key (clients.identity)
    rows: int = 0
    rounds_seen: int = 0  # trained rounds whose reply reached the server
    rounds_reported: int = 0  # rounds in the client's own ledger (its latest reply)
    declined: int = 0
    steps_seen: int = 0
    epsilon: float = 0.0  # the client's latest reported figure
    sample_rate: float = math.nan
    noise_multipliers: list[float] = field(default_factory=list)  # one per trained round seen
    last_round: int = 0
    releases: list[tuple[float, float, int]] = field(default_factory=list)  # (z, q, steps) seen

    @property
    def ledger_complete(self) -> bool:
        return self.rounds_reported >= self.rounds_seen


def _float(v: Any) -> float:
    """A float as :func:`run_folder.jsonable` wrote it (NaN as None, infinities as strings)."""
    return math.nan if v is None else float(v)


class LocalPrivacyMonitor:
    """Collects clients' local-DP reports (a no-op unless the run uses local DP).

    Each round costs time in the clients it heard from, not in every client seen so far. Once
    :meth:`attach` names the run folder, the table lives in ``operator_only/local_monitor.jsonl``
    (:data:`run_folder.LOCAL_MONITOR_JOURNAL`): one line per round, appended and fsynced in
    :meth:`observe_round` (before the round is checkpointed or published), and the checkpoint holds
    only a reference to it; without a run folder the checkpoint holds the whole table.
    """

    def __init__(self, rc: RunConfig):
        self.enabled = rc.privacy.mode in ("local", "central_local")
        self.rc = rc
        self.delta = float(rc.privacy.local.delta)
        self.clients: dict[str, ClientEntry] = {}
        self.unattributed = 0  # replies without a client key (should not happen)
        self.figures = RunningFigures()  # each client's figure (see :meth:`epsilons`), max and mean
        self.journal: Path | None = None  # the run's table on disk, once attached
        self._journal_round, self._journal_lines = 0, 0  # the last round it holds, its line count
        self._round: list[list[Any]] = []  # this round's observations, for the journal

    def attach(self, run_dir: str | Path, resumed: bool) -> None:
        """Keep the table in ``run_dir``'s journal, under ``operator_only/`` (it names which clients
        reported in which round and their row counts: under central_local exactly what the central
        guarantee hides). ``resumed``: False starts the journal empty; True leaves it for
        :meth:`load_state_dict`, whose checkpoint reference says how much of it to replay."""
        if not self.enabled:
            return
        self.journal = Path(run_dir) / run_folder.LOCAL_MONITOR_JOURNAL
        if not resumed:
            durable_write_text(self.journal, "")  # created durably (its folder entry fsynced)

    def state_dict(self) -> dict[str, Any]:
        """For the run's checkpoint: a reference to the journal (O(1)) or, unattached, the table."""
        if self.journal is not None:
            return {"journal": run_folder.LOCAL_MONITOR_JOURNAL, "round": self._journal_round,
                    "lines": self._journal_lines, "clients_seen": len(self.clients), "unattributed": self.unattributed}
        return {"clients": [asdict(e) for e in self.clients.values()], "unattributed": self.unattributed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clients, self.figures = {}, RunningFigures()
        self.unattributed = int(state.get("unattributed", 0))
        if "journal" in state:
            self._replay(state)
            return
        self._load_table(state.get("clients", []))
        if self.journal is not None:  # a checkpoint that held the table: the journal starts from it
            self._journal_round, self._journal_lines = 0, 1
            run_folder.rewrite_jsonl(self.journal, [{"round": 0, "unattributed": self.unattributed,
                                                     "table": state.get("clients", [])}])

    def _load_table(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            row = dict(row)
            for key in ("epsilon", "sample_rate"):
                row[key] = _float(row.get(key, 0.0 if key == "epsilon" else None))
            row["noise_multipliers"] = [_float(z) for z in row.get("noise_multipliers", [])]
            row["releases"] = [(_float(z), _float(q), int(n)) for z, q, n in row.get("releases", [])]
            entry = ClientEntry(**row)
            self.clients[entry.client_id] = entry
            self._refresh(entry)

    def _replay(self, ref: dict[str, Any]) -> None:
        """Rebuild the table from the journal lines up to the checkpoint's round; lines after it (a
        round recorded in the journal, then the run stopped before its checkpoint) are dropped."""
        if self.journal is None:
            raise RunFolderError("the local-DP table is in the run folder's journal: attach the run folder first")
        if not self.journal.exists():
            raise RunFolderError(f"cannot resume: {run_folder.LOCAL_MONITOR_JOURNAL} is missing, so the local-DP "
                                 "table (clients' epsilons) cannot be rebuilt")
        last = int(ref["round"])
        raw = [ln for ln in self.journal.read_text().splitlines() if ln.strip()]
        lines = [r for r in run_folder.read_jsonl(self.journal) if int(r["round"]) <= last]  # a torn last line dropped
        if len(lines) != int(ref["lines"]):
            raise RunFolderError(f"cannot resume: {run_folder.LOCAL_MONITOR_JOURNAL} holds {len(lines)} lines up to "
                                 f"round {last}, the checkpoint expects {ref['lines']}: the file is damaged")
        if len(lines) < len(raw):  # drop later (and torn) lines for good, before the resumed run appends
            durable_write_text(self.journal, "".join(ln + "\n" for ln in raw[:len(lines)]))
        for line in lines:
            if "table" in line:
                self._load_table(line["table"])
            else:
                for obs in line["obs"]:
                    self._refresh(self._apply(int(line["round"]), obs))
            self.unattributed = int(line["unattributed"])
        self._journal_round, self._journal_lines = last, len(lines)

    # ------------------------------------------------------------------ per round

    def observe_round(self, server_round: int, replies: Iterable[Any], record: dict[str, Any]) -> None:
        """Read the round's successful replies (trained and declined); add the round's metrics to
        ``record`` (and drop per-client values Flower averaged into it). Attached, the round's
        observations are appended to the journal and fsynced before this returns."""
        if not self.enabled:
            return
        for msg in replies:
            if "clients" in msg.content:  # a worker's share: one report per client, as lists
                local, keys = msg.content["local"], list(msg.content["clients"]["keys"])
                for i, key in enumerate(keys):
                    self.observe_metrics(server_round, {f: local[f][i] for f in local}, key)
            elif "clients-trained" not in msg.content["metrics"]:
                client = msg.content["client"] if "client" in msg.content else None
                self.observe_metrics(server_round, msg.content["metrics"], None if client is None else client.get("key"))
        if self.journal is not None:
            run_folder.append_jsonl(self.journal, {"round": int(server_round), "unattributed": self.unattributed,
                                                   "obs": self._round})
            self._journal_round, self._journal_lines = int(server_round), self._journal_lines + 1
        self._round = []
        for key in _UNAVERAGEABLE:
            record.pop(key, None)
        record["local_epsilon_max"] = self.figures.max()
        record["local_epsilon_mean"] = self.figures.mean()

    def observe_metrics(self, server_round: int, metrics: Any, key: Any) -> None:
        """One client's report into the table (and, attached, into the round's journal line)."""
        if key is None or "local_epsilon" not in metrics:
            self.unattributed += 1
            return
        cid = str(key)
        e = self.clients.get(cid) or ClientEntry(cid)
        declined = float(metrics.get("declined", 0.0)) > 0
        obs = [cid, int(metrics.get("num-examples", e.rows)), float(metrics["local_epsilon"]),
               int(metrics.get("local_rounds", e.rounds_reported)), float(metrics.get("local_sample_rate", e.sample_rate)),
               int(declined), None if declined else float(metrics.get("local_noise_multiplier", math.nan)),
               0 if declined else int(metrics.get("local_steps", 0))]
        self._apply(server_round, obs)
        self._round.append(obs)
        self._refresh(self.clients[cid])

    def _apply(self, server_round: int, obs: list[Any]) -> ClientEntry:
        """One observation into the table (live, or replayed from the journal: the same code)."""
        cid, rows, eps, rounds, q, declined, z, steps = obs
        e = self.clients.get(str(cid))
        if e is None:
            e = self.clients[str(cid)] = ClientEntry(str(cid))
        e.rows, e.epsilon, e.rounds_reported, e.sample_rate = int(rows), _float(eps), int(rounds), _float(q)
        e.last_round = int(server_round)
        if declined:
            e.declined += 1
            return e
        e.rounds_seen += 1
        e.steps_seen += int(steps)
        e.noise_multipliers.append(_float(z))
        e.releases.append((_float(z), e.sample_rate, int(steps)))
        return e

    def _refresh(self, e: ClientEntry) -> None:
        """Recompute one client's figure (only clients heard from this round change)."""
        self.figures.set(e.client_id, e.epsilon if e.ledger_complete else max(e.epsilon, self._recomputed(e)))

    def epsilons(self) -> list[float]:
        """Each client's figure; a lost ledger's is at least what the releases the server saw cost
        (the same rule as the end-of-run table, so a round's figure never reads lower)."""
        return list(self.figures.values.values())

    # ------------------------------------------------------------------ end of run

    def _recomputed(self, e: ClientEntry) -> float:
        """Epsilon of the releases the server saw (a lower bound on the client's true spend)."""
        ledger = PrivacyLedger()
        for z, q, steps in e.releases:
            if steps > 0:
                ledger.record(z, q, "poisson", count=steps)
        return float(ledger.epsilon(self.delta, self.rc.privacy.accountant))

    def section(self) -> dict[str, Any]:
        """The full ``local`` section: the guarantee, the figures and the per-client table."""
        lo = self.rc.privacy.local
        caveats: list[str] = []
        rows = []
        for cid in sorted(self.clients):
            e = self.clients[cid]
            epsilon = self.figures.values[cid]  # max(reported, recomputed) where the ledger is incomplete
            if not e.ledger_complete:
                caveats.append(
                    f"client {cid}'s ledger holds {e.rounds_reported} rounds but the server saw it train "
                    f"{e.rounds_seen}: its state was lost (a wiped state-dir?); its epsilon here is recomputed from "
                    f"the releases the server saw, and its budget stop was not enforced on the missing rounds"
                )
            rows.append({
                "client_id": cid,
                "rows": e.rows,
                "rounds_participated": max(e.rounds_reported, e.rounds_seen),
                "rounds_declined": e.declined,
                "steps": e.steps_seen,
                "sample_rate": e.sample_rate,
                "noise_multipliers": sorted(set(round(z, 6) for z in e.noise_multipliers)),
                "epsilon": epsilon,
                "delta_below_1_over_rows": bool(e.rows > 0 and self.delta < 1.0 / e.rows),
            })
        small = [r["client_id"] for r in rows if not r["delta_below_1_over_rows"]]
        if small:
            caveats.append(
                f"privacy.local.delta={self.delta:g} is not below 1/n for clients {small[:20]}"
                f"{' ...' if len(small) > 20 else ''}: publishing each example with probability delta is "
                f"(0, delta)-DP yet leaks about n * delta >= 1 of a client's n examples; keep delta << 1/n"
            )
        if not lo.secure_mode:
            caveats.append(
                "DP-SGD noise and batch sampling come from PyTorch's Mersenne-Twister generator (not a CSPRNG)"
                + (" seeded from the run's seed (privacy.secure_rng=false): reproducible, NOT for release"
                   if not self.rc.privacy.secure_rng else " seeded with 63 bits from Python's secrets module (the OS CSPRNG)")
                + "; privacy.local.secure_mode=true uses Opacus's CSPRNG (needs torchcsprng)"
            )
        if self.unattributed:
            caveats.append(f"{self.unattributed} replies carried no local-DP report")
        return {
            "unit": "example",
            "guarantee": (
                f"Example-level differential privacy for each client's own data: for every client i and any "
                f"two versions of its training rows that differ in one example replaced by a null example "
                f"(zero-out: the client's row count is public, it sets the sampling rate, the step count and the "
                f"num-examples its replies carry), everything client i sent to the server over the whole run (its "
                f"model in each round it trained, and figures computed from its row count and its ledger) is "
                f"(epsilon_i, {self.delta:g})-DP. Each client computes and enforces this itself (DP-SGD with Opacus, "
                f"its own ledger on its own disk, kept across restarts), so it holds without trusting the server. "
                f"It does not hide whether a client took part, how many rows it has, or what its data set as a whole "
                f"looks like (that is user-level DP: privacy.mode=central / central_local). Separate runs on the "
                f"same data compose: their epsilons add up at least."
            ),
            "mechanism": "DP-SGD: per-example gradients clipped to max_grad_norm, Gaussian noise "
                         "noise_multiplier * max_grad_norm on each step's sum, Poisson-sampled batches",
            "accountant": self.rc.privacy.accountant,
            "neighbouring_relation": "zero_out (one example of one client replaced by a null example; row count public)",
            "randomness": (
                "Opacus's CSPRNG for DP-SGD noise and batch sampling (privacy.local.secure_mode=true)" if lo.secure_mode
                else "PyTorch CPU generators (Mersenne Twister, not a CSPRNG) for DP-SGD noise and Poisson batch "
                     "sampling, " + ("seeded from the run's seed, round and client: reproducible, NOT for release"
                                     if not self.rc.privacy.secure_rng else
                                     "seeded with 63 bits from Python's secrets (the OS CSPRNG) every round")
            ),
            "delta": self.delta,
            "target_epsilon": lo.target_epsilon,
            "epsilon_bound": lo.target_epsilon,
            "noise_multiplier": lo.noise_multiplier,
            "epsilon_max": self.figures.max(),  # the last round's local_epsilon_max, exactly
            "epsilon_mean": self.figures.mean(),
            "max_grad_norm": lo.max_grad_norm,
            "clipping": lo.clipping,
            "grad_sample_mode": lo.grad_sample_mode,
            "batch_size": self.rc.train.batch_size,
            "local_epochs": self.rc.train.local_epochs,
            "expected_rounds": lo.expected_rounds,
            "clients_reporting": len(rows),
            "clients_declined_any_round": sum(1 for r in rows if r["rounds_declined"] > 0),
            "clients": rows,
            "caveats": caveats,
        }

    @property
    def table_is_public(self) -> bool:
        """Only without central DP: under central_local the table reveals who was sampled, and rows."""
        return self.rc.privacy.mode == "local"

    def published_section(self, full: dict[str, Any]) -> dict[str, Any]:
        """The ``local`` section as privacy.json may carry it (see the module's docstring)."""
        if self.table_is_public:
            return full
        hidden = ("epsilon_max", "epsilon_mean", "clients_reporting", "clients_declined_any_round", "clients")
        section = {k: v for k, v in full.items() if k not in hidden}
        section["caveats"] = [c for c in full["caveats"] if c.startswith("DP-SGD noise")]
        section["operator_only"] = (
            "the per-client table, the largest and mean client epsilon and the clients' own caveats are in "
            "operator_only/privacy_details.json: they reveal which clients were sampled in which round and how "
            "many rows each holds, which the central guarantee hides"
        )
        if section["epsilon_bound"] is None:
            section["epsilon_bound_note"] = ("no privacy.local.target_epsilon: each client's epsilon depends on its "
                                             "rows and participations and is not published; the client knows its own")
        return section

    def extend_report(self, report: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(published report, operator-only details): the run's report with its ``local`` section.

        The published summary gains ``local_delta`` and either ``local_epsilon_max`` /
        ``local_epsilon_mean`` (privacy=local) or ``local_epsilon_bound`` (central_local: the budget
        every client enforces); the local caveats join ``privacy_caveats``.
        """
        if not self.enabled:
            return report, None
        full = self.section()
        section = self.published_section(full)
        report = dict(report) if report is not None else {"mode": self.rc.privacy.mode}
        report["local"] = section
        summary = dict(report.get("summary", {}))
        if self.table_is_public:
            summary["local_epsilon_max"] = full["epsilon_max"]
            summary["local_epsilon_mean"] = full["epsilon_mean"]
        else:
            summary["local_epsilon_bound"] = full["epsilon_bound"]
        summary["local_delta"] = self.delta
        summary["privacy_caveats"] = list(summary.get("privacy_caveats", [])) + [
            f"local DP: {c}" for c in section["caveats"]
        ]
        report["summary"] = summary
        operator = None if self.table_is_public else {"local": full}
        return report, operator
