"""The server's view of local (example-level) DP: what clients report about their own ledgers.

Under ``privacy.mode`` local / central_local every client runs DP-SGD and keeps its own ledger
(:mod:`clients.dp_sgd`); the guarantee is computed and enforced by the client, so the server needs
no trust for it. Each reply carries the client's epsilon after the round (``local_epsilon``, also on
a declined round), its id and rounds trained (``local_client_id``, ``local_rounds``), the round's
DP-SGD steps, noise multiplier and sampling rate. :class:`LocalPrivacyMonitor` collects them into

* per-round metrics ``local_epsilon_max`` / ``local_epsilon_mean`` over every client heard from so
  far (its latest figure): the privacy spent up to that round;
* summary keys ``local_epsilon_max``, ``local_epsilon_mean``, ``local_delta``;
* the ``local`` section of ``privacy.json``: the guarantee in words and a per-client table.

It also checks what the server can check: that a client's ledger counts at least the rounds the
server saw it train (a ledger kept on another simulated node, or lost, would under-count; the
client's figure is then replaced by one recomputed from the releases the server saw), and that
``privacy.local.delta`` is below ``1/n`` for every client's ``n`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from fedpriv.config import RunConfig

# Per-reply keys that Flower's metric averaging turns into meaningless averages (declined replies
# are never aggregated, so "declined" would always average to 0; clients_declined counts them).
_UNAVERAGEABLE = ("local_client_id", "local_rounds", "local_epsilon", "declined")


@dataclass
class ClientEntry:
    client_id: int
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


class LocalPrivacyMonitor:
    """Collects clients' local-DP reports (a no-op unless the run uses local DP)."""

    def __init__(self, rc: RunConfig):
        self.enabled = rc.privacy.mode in ("local", "central_local")
        self.rc = rc
        self.delta = float(rc.privacy.local.delta)
        self.clients: dict[int, ClientEntry] = {}
        self.unattributed = 0  # replies without a client id (should not happen)

    # ------------------------------------------------------------------ per round

    def observe_round(self, server_round: int, replies: Iterable[Any], record: dict[str, Any]) -> None:
        """Read the round's successful replies (trained and declined); add the round's metrics to
        ``record`` (and drop per-client values Flower averaged into it)."""
        if not self.enabled:
            return
        for msg in replies:
            self.observe_metrics(server_round, msg.content["metrics"])
        for key in _UNAVERAGEABLE:
            record.pop(key, None)
        eps = self.epsilons()
        record["local_epsilon_max"] = max(eps) if eps else 0.0
        record["local_epsilon_mean"] = sum(eps) / len(eps) if eps else 0.0

    def observe_metrics(self, server_round: int, metrics: Any) -> None:
        if "local_client_id" not in metrics or "local_epsilon" not in metrics:
            self.unattributed += 1
            return
        cid = int(metrics["local_client_id"])
        e = self.clients.setdefault(cid, ClientEntry(cid))
        e.rows = int(metrics.get("num-examples", e.rows))
        e.epsilon = float(metrics["local_epsilon"])
        e.rounds_reported = int(metrics.get("local_rounds", e.rounds_reported))
        e.sample_rate = float(metrics.get("local_sample_rate", e.sample_rate))
        e.last_round = int(server_round)
        if float(metrics.get("declined", 0.0)) > 0:
            e.declined += 1
            return
        z, steps = float(metrics.get("local_noise_multiplier", math.nan)), int(metrics.get("local_steps", 0))
        e.rounds_seen += 1
        e.steps_seen += steps
        e.noise_multipliers.append(z)
        e.releases.append((z, e.sample_rate, steps))

    def epsilons(self) -> list[float]:
        return [e.epsilon for e in self.clients.values()]

    # ------------------------------------------------------------------ end of run

    def _recomputed(self, e: ClientEntry) -> float:
        """Epsilon of the releases the server saw (a lower bound on the client's true spend)."""
        from fedpriv.privacy.ledger import PrivacyLedger

        ledger = PrivacyLedger()
        for z, q, steps in e.releases:
            if steps > 0:
                ledger.record(z, q, "poisson", count=steps)
        return float(ledger.epsilon(self.delta, self.rc.privacy.accountant))

    def section(self) -> dict[str, Any]:
        """The ``local`` section of privacy.json."""
        lo = self.rc.privacy.local
        caveats: list[str] = []
        rows = []
        for cid in sorted(self.clients):
            e = self.clients[cid]
            epsilon = e.epsilon
            if not e.ledger_complete:
                epsilon = max(epsilon, self._recomputed(e))
                caveats.append(
                    f"client {cid}'s ledger holds {e.rounds_reported} rounds but the server saw it train "
                    f"{e.rounds_seen}: its context.state was not kept across rounds (another simulated node "
                    f"served it, or the node restarted); its epsilon here is recomputed from the releases the "
                    f"server saw, and its budget stop was not enforced on the missing rounds"
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
                "DP-SGD noise and batch sampling come from PyTorch's generator (not a CSPRNG)"
                + (" seeded from the run's seed (privacy.secure_rng=false): reproducible, NOT for release"
                   if not self.rc.privacy.secure_rng else " seeded from the OS's entropy")
                + "; privacy.local.secure_mode=true uses Opacus's CSPRNG (needs torchcsprng)"
            )
        if self.rc.resume:
            caveats.append("the run was resumed: clients' ledgers live in their nodes' context.state, which a "
                           "restarted simulation does not keep, and this table covers only rounds since the restart")
        if self.unattributed:
            caveats.append(f"{self.unattributed} replies carried no local-DP report")
        epsilons = [r["epsilon"] for r in rows]
        eps_max = max(epsilons) if epsilons else 0.0
        return {
            "unit": "example",
            "guarantee": (
                f"Example-level differential privacy for each client's own data: for every client i and any "
                f"two versions of its training rows differing by one example (added or removed), everything "
                f"client i sent to the server over the whole run (its model in each round it trained) is "
                f"(epsilon_i, {self.delta:g})-DP, epsilon_i being its entry below (at most {eps_max:.3f}). "
                f"Each client computes and enforces this itself (DP-SGD with Opacus, its own ledger), so it "
                f"holds without trusting the server. It does not hide whether a client took part or what its "
                f"data set as a whole looks like (that is user-level DP: privacy.mode=central / central_local)."
            ),
            "mechanism": "DP-SGD: per-example gradients clipped to max_grad_norm, Gaussian noise "
                         "noise_multiplier * max_grad_norm on each step's sum, Poisson-sampled batches",
            "accountant": self.rc.privacy.accountant,
            "neighbouring_relation": "add_or_remove_one (one example of one client)",
            "delta": self.delta,
            "target_epsilon": lo.target_epsilon,
            "noise_multiplier": lo.noise_multiplier,
            "epsilon_max": eps_max,
            "epsilon_mean": sum(epsilons) / len(epsilons) if epsilons else 0.0,
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

    def extend_report(self, report: dict[str, Any] | None) -> dict[str, Any] | None:
        """The run's privacy report with the ``local`` section added (a new report in mode local).

        Its ``summary`` gains ``local_epsilon_max``, ``local_epsilon_mean``, ``local_delta`` and
        the local caveats (appended to ``privacy_caveats``).
        """
        if not self.enabled:
            return report
        section = self.section()
        report = dict(report) if report is not None else {"mode": self.rc.privacy.mode}
        report["local"] = section
        summary = dict(report.get("summary", {}))
        summary["local_epsilon_max"] = section["epsilon_max"]
        summary["local_epsilon_mean"] = section["epsilon_mean"]
        summary["local_delta"] = self.delta
        summary["privacy_caveats"] = list(summary.get("privacy_caveats", [])) + [
            f"local DP: {c}" for c in section["caveats"]
        ]
        report["summary"] = summary
        return report
