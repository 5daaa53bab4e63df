"""Distributed DP: the server runs SecAgg+ and decodes only the noised sum, around a Flower strategy.

Each round is four exchanges with the sampled clients (:mod:`fedpriv.secagg`'s stages, answered by
:mod:`clients.secagg_share`): the clients clip, encode and noise their own updates, and what the
server ends with is the sum modulo ``2^b`` of the survivors' vectors, which it decodes
(:func:`fedpriv.privacy.distributed.decode`), divides by the expected cohort ``E[m]`` and hands to
the wrapped Flower strategy as one reply (as central DP does). A round whose survivors are fewer
than ``min_survivors``, or whose secrets cannot be recovered, is dropped: nothing is released,
nothing is spent, the model stays.

The ledger counts released rounds; epsilon is the Skellam mechanism's (:mod:`fedpriv.privacy.skellam`)
for two observers: anyone who sees the released models but not who took part (amplified by Poisson
sampling), and the server, which knows every cohort (no amplification: a client counted in every
round it could join). The noise is calibrated for ``privacy.distributed.calibrate_for``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedpriv import updates
from fedpriv.config import ConfigError, RunConfig
from fedpriv.distributed_config import min_survivors, share_threshold
from fedpriv.privacy import skellam
from fedpriv.privacy.budget import default_delta
from fedpriv.privacy.distributed import DistributedPlan, decode, make_plan
from fedpriv.secagg import SecAggError, SecAggParams, SecAggServer, from_json, to_json, unpack
from fedpriv.task import new_model

log = logging.getLogger("fedpriv")

STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK = "advertise", "share-keys", "masked-input", "unmask"


def _largest_cohort(rc: RunConfig) -> int:
    """The cohort the modulus must hold: everyone under ``all``; under Poisson, E[m] + 6 sd + 6."""
    if rc.sampling == "all":
        return rc.num_clients
    m = rc.clients_per_round
    return min(rc.num_clients, int(math.ceil(m + 6 * math.sqrt(m) + 6)))


def make_plan_for(rc: RunConfig) -> tuple[DistributedPlan, float]:
    """The run's plan (one line per impossible request) and its delta."""
    d, p = rc.privacy.distributed, rc.privacy
    dim = sum(int(np.prod(v.shape)) for v in new_model(rc).state_dict().values())  # what travels
    q = 1.0 if rc.sampling == "all" else rc.clients_per_round / rc.num_clients
    delta = p.delta if p.delta is not None else default_delta(rc.num_clients)
    try:
        plan = make_plan(dim=dim, clip_norm=p.clip_norm, bits=d.bits, target_epsilon=float(p.target_epsilon),
                         delta=delta, rounds=rc.num_rounds, sample_rate=q if d.calibrate_for == "released_model" else 1.0,
                         min_survivors=min_survivors(rc), colluders=d.colluders, max_clients=_largest_cohort(rc))
    except ValueError as exc:
        raise ConfigError(f"config key 'privacy.distributed.bits': {exc}") from None
    return plan, delta


def _with_int_ids(stage: str, payload: Any) -> Any:
    """JSON turned the client ids inside a stage's answer into strings; back to ints."""
    if stage == STAGE_SHARE:  # {recipient: ciphertext}
        return {int(v): c for v, c in payload.items()}
    if stage == STAGE_UNMASK:  # {"seed": {client: share}, "key": {client: share}}
        return {part: {int(v): x for v, x in payload.get(part, {}).items()} for part in ("seed", "key")}
    return payload


class DistributedDPAggregator:
    """The server's side of distributed DP (an :class:`~fedpriv.aggregation.Aggregator` with ``exchange``).

    Args (privacy meaning):
        inner: the wrapped Flower aggregation; sees only the decoded, noised average.
        plan: the encoding and noise every client applies (the same every round).
        sample_rate: Poisson rate of the cohorts (the released model's amplification).
        denominator: ``E[m]``; the noised sum is divided by it, whoever survives.
        delta: the delta of both epsilons.
    """

    def __init__(self, rc: RunConfig, inner: Any, plan: DistributedPlan, delta: float):
        self.rc, self.inner, self.plan, self.delta = rc, inner, plan, delta
        self.sample_rate = 1.0 if rc.sampling == "all" else rc.clients_per_round / rc.num_clients
        self.denominator = float(rc.num_clients if rc.sampling == "all" else rc.clients_per_round)
        d = rc.privacy.distributed
        self.params = SecAggParams(bits=d.bits, dim=plan.padded, neighbours=d.neighbours,
                                   threshold=share_threshold(rc), min_survivors=plan.min_survivors)
        self.released = 0  # rounds released so far (what the ledger composes)
        self.dropped = 0  # rounds dropped by the protocol (never released)
        self._round: dict[str, Any] = {}

    @classmethod
    def from_config(cls, rc: RunConfig, inner: Any) -> DistributedDPAggregator:
        plan, delta = make_plan_for(rc)
        return cls(rc, inner, plan, delta)

    # -- the round ---------------------------------------------------------------------------
    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Any) -> dict[str, Any]:
        self.inner.begin_round(server_round, arrays, grid)
        return {}

    def share_config(self, server_round: int) -> dict[str, Any]:
        return {}

    def exchange(self, population: Any, server_round: int, cohort: list[int], arrays: ArrayRecord,
                 config: dict[str, Any]) -> tuple[list[tuple[Message, int]], list[Message], int]:
        """SecAgg+'s four stages; returns the masked-input stage's messages, replies and the clients
        that never answered it (what the engine counts), and keeps the decoded sum for :meth:`aggregate`."""
        seed = secrets.randbits(62)
        # A cohort smaller than the neighbourhood makes everyone a neighbour of everyone: the threshold then
        # stays a majority of the real neighbourhood (r - 1 colluders of it learn nothing, and one more
        # dropout than half of it still leaves the round recoverable).
        neighbourhood = min(self.params.neighbours, max(len(cohort) - 1, 1))
        params = replace(self.params, neighbours=neighbourhood,
                         threshold=max(2, min(self.params.threshold, neighbourhood // 2 + 1)))
        base = {**config, "secagg-params": json.dumps(asdict(params)),
                "secagg-plan": json.dumps(asdict(self.plan)), "secagg-rotation-seed": seed}
        server = SecAggServer(params, cohort)
        self._round = {"seed": seed, "total": None, "survivors": 0, "why": ""}
        empty = ArrayRecord()
        masked_msgs: list[tuple[Message, int]] = []
        masked_replies: list[Message] = []
        missing = len(cohort)
        try:
            got = self._stage(population, server_round, cohort, STAGE_ADVERTISE, {}, empty, base)[1]
            self._enough(got, "advertised their keys")
            keys = server.keys_for(got)
            got = self._stage(population, server_round, sorted(keys), STAGE_SHARE, keys, empty, base)[1]
            self._enough(got, "shared their secrets")
            forwarded = server.forward_shares(got)
            masked_msgs, got, masked_replies = self._stage(population, server_round, sorted(forwarded), STAGE_MASKED,
                                                           forwarded, arrays, base)
            missing = len(cohort) - len(got)
            masked = {}
            for reply in masked_replies:
                if reply.has_error() or "arrays" not in reply.content:
                    continue
                try:
                    total = unpack(reply.content["arrays"]["masked-sum"].numpy(), self.params.bits, self.plan.padded)
                except (KeyError, ValueError) as exc:  # malformed: its clients count as dropped (masks recovered)
                    log.info("round %d: a masked-input reply is malformed (%s)", server_round, exc)
                    continue
                clients = [int(c) for c in reply.content["config"]["secagg-clients"]]
                if clients:  # a worker's sum stands for its clients: the first carries it, the others add 0
                    masked[clients[0]] = total
                    masked.update({c: np.zeros_like(total) for c in clients[1:]})
            requests = server.unmask_requests(masked)
            asks = {u: {"survivors": s, "dropped": d} for u, (s, d) in requests.items()}
            revealed = self._stage(population, server_round, sorted(asks), STAGE_UNMASK, asks, empty, base)[1]
            total, survivors = server.aggregate(revealed)
            self._round.update(total=total, survivors=len(survivors))
        except SecAggError as exc:
            self._round["why"] = str(exc)
            log.warning("round %d: %s", server_round, exc)
        return masked_msgs, masked_replies, max(0, missing)

    def _enough(self, got: dict[int, Any], what: str) -> None:
        if len(got) < self.plan.min_survivors:
            raise SecAggError(f"only {len(got)} clients {what}, fewer than the {self.plan.min_survivors} a release "
                              "needs: the round is dropped")

    def _stage(self, population: Any, server_round: int, clients: list[int], stage: str, payloads: dict[int, Any],
               arrays: ArrayRecord, base: dict[str, Any]):
        """Send one stage to ``clients`` (each message with its clients' payloads); returns the
        messages, every answering client's payload, and the replies."""
        messages = population.messages(clients, server_round, arrays, {**base, "secagg-stage": stage})
        for msg, _ in messages:
            cfg = msg.content["config"]
            named = [int(c) for c in cfg["client-ids"]] if "client-ids" in cfg else [int(cfg["client-id"])]
            cfg["secagg-payload"] = json.dumps(to_json({c: payloads.get(c, {}) for c in named}))
        replies, _ = population.dispatch(messages) if clients else ([], 0)
        got: dict[int, Any] = {}
        for reply in replies:
            if reply.has_error():
                continue
            answered = from_json(json.loads(str(reply.content["config"]["secagg-payload"])))
            for c in reply.content["config"]["secagg-clients"]:
                got[int(c)] = _with_int_ids(stage, answered.get(str(int(c))))
        return messages, got, replies

    def reply_problem(self, reply: Message, global_arrays: dict[str, np.ndarray]) -> str | None:
        """The masked sums are checked by the protocol itself (a wrong one fails to decode into anything
        but noise); a reply must carry the stage's records."""
        content = reply.content
        ok = "config" in content and "secagg-clients" in content["config"] and "arrays" in content
        return None if ok else "not a masked-input reply"

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> tuple[ArrayRecord | None, dict[str, Any]]:
        metrics: dict[str, Any] = {"secagg_survivors": self._round.get("survivors", 0)}  # operator-only
        total = self._round.get("total")
        if total is None:
            self.dropped += 1
            return None, {**metrics, "secagg_released": 0.0}
        global_np = updates.from_record(arrays)
        flat = decode(total, self.plan, self._round["seed"]) / self.denominator
        new_global, at = {}, 0
        for k, v in global_np.items():
            n = int(np.prod(v.shape))
            new_global[k] = (v.astype(np.float64) + flat[at:at + n].reshape(v.shape)).astype(v.dtype)
            at += n
        synthetic = Message(RecordDict({"arrays": updates.to_record(new_global),
                                        "metrics": MetricRecord({"num-examples": 1.0})}),
                            dst_node_id=0, message_type="train")
        new_arrays, _ = self.inner.aggregate(server_round, arrays, [synthetic])
        self.released += 1
        return (new_arrays if new_arrays is not None else updates.to_record(new_global)), {
            **metrics, "secagg_released": 1.0, "epsilon": self.epsilons()["released_model"]}

    def covered_metric_keys(self) -> tuple[str, ...]:
        """The running epsilon is a function of the rounds released, which the models show anyway."""
        return ("epsilon",)

    # -- the ledger ---------------------------------------------------------------------------------
    def epsilons(self) -> dict[str, float]:
        released = skellam.epsilon(self.plan.rounds(self.released, self.sample_rate), self.delta)
        server = skellam.epsilon(self.plan.rounds(self.released, 1.0), self.delta)
        return {"released_model": released, "server": server}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "released": self.released, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.released, self.dropped = int(state["released"]), int(state["dropped"])

    # -- the report ---------------------------------------------------------------------------------
    def privacy_report(self) -> dict[str, Any]:
        """privacy.json: both epsilons, the relation, the threat model, the plan, the caveats."""
        rc, d, plan = self.rc, self.rc.privacy.distributed, self.plan
        eps = self.epsilons()
        caveats = [
            "the epsilon for the released model assumes the cohorts stay secret (amplification by Poisson sampling): "
            "the operator must not publish who took part; against the server, which knows them, see "
            "epsilon_against_server",
            "Skellam noise is drawn as the difference of two numpy Poisson variates (PTRS) from a generator seeded with "
            "128 bits of the OS CSPRNG: not an exact, floating-point-safe sampler (OpenDP has none for Poisson)",
            "a malicious server (one that lies to clients about who dropped) is not defended against",
        ]
        if not rc.privacy.secure_rng:
            caveats.append("NOT FOR RELEASE: rounding and noise drawn from seeded generators (privacy.secure_rng=false)")
        t, c = plan.min_survivors, plan.colluders
        words = (
            f"User-level distributed differential privacy: for any one client, adding or removing all of its data "
            f"changes the distribution of the {self.released} released model update(s) by at most (epsilon="
            f"{eps['released_model']:.4g}, delta={self.delta:.3g}) for anyone who sees the models but not who took part "
            f"(Poisson sampling, rate {self.sample_rate:.4g}), and by at most (epsilon={eps['server']:.4g}, "
            f"delta={self.delta:.3g}) for the server, which knows each round's cohort and sees only the sum (secure "
            f"aggregation), counting the client in every round. Each client clips its update to L2 norm "
            f"{plan.clip_norm:g}, quantises it and adds its share of Skellam noise so that any {t} survivors, {c} of "
            f"them colluding with the server, still carry variance {plan.variance:.4g} per coordinate; a round with "
            f"fewer survivors is dropped, never released. Accountant: the Skellam mechanism's RDP (Agarwal et al. 2021), "
            f"Poisson subsampling under add/remove (Steinke 2022, arXiv:2210.00597), dp-accounting's conversion."
        )
        summary = {"epsilon": eps["released_model"], "epsilon_against_server": eps["server"], "delta": self.delta,
                   "accountant": "rdp (skellam)", "sampling": rc.sampling, "target_epsilon": rc.privacy.target_epsilon,
                   "calibrate_for": d.calibrate_for, "privacy_caveats": caveats}
        return {
            "summary": summary,
            "guarantee": words,
            "unit": "user (client)",
            "neighbouring_relation": "add_or_remove_one",
            "epsilon": eps["released_model"],
            "epsilon_against_server": eps["server"],
            "delta": self.delta,
            "accountant": "rdp (skellam)",
            "rounds_released": self.released,
            "rounds_dropped": self.dropped,
            "sampling": {"scheme": rc.sampling, "rate": self.sample_rate, "population": rc.num_clients,
                         "noise_denominator": self.denominator},
            "mechanism": {"name": "distributed skellam with secure aggregation (SecAgg+)", **plan.as_dict(),
                          "noise_stddev_at_threshold": plan.noise_stddev(t)},
            "threat_model": {
                "server": "honest but curious: runs the protocol, sees every message it receives, knows the cohorts",
                "colluding_clients": f"up to {c} clients may share their noise with the server (their shares are not "
                                     f"counted), and up to {self.params.threshold - 1} of one neighbourhood may share "
                                     "their secret shares without unmasking anyone",
                "dropouts": f"any number, as long as {t} masked inputs arrive and every dropped client keeps "
                            f"{self.params.threshold} live holders of its shares; otherwise the round is dropped",
                "malicious_server": "not defended: by lying about dropouts to different clients it could recover one "
                                    "client's masks (Bell et al. 2020's consistency checks are not implemented)",
            },
            "secure_rng": rc.privacy.secure_rng,
            "caveats": caveats,
        }
