"""A client's part in a round of distributed DP (``privacy=distributed``): the four SecAgg+ stages.

One message names one client (deployment: the SuperNode is that client) or a worker's share of the
cohort (simulation); each named client acts on its own: its keys, self-mask seed and the shares it
holds live in its own state store between stages (a simulated client may be served by another
worker at the next stage), and are deleted once it has answered the unmask stage (or, if it dropped
out mid-round, when it next takes part).

* ``advertise``: two fresh key pairs; the public keys go back.
* ``share-keys``: the neighbours' public keys in; encrypted shares of its secrets out.
* ``masked-input``: the shares addressed to it in, plus the global model; it trains, encodes its
  update (clip, rotate, quantise, its Skellam share; :func:`fedpriv.privacy.distributed.encode`)
  and masks it; nothing else of its training leaves it (no loss, no norm: the server is not trusted). A worker adds its clients' masked vectors modulo ``2^b`` (masked, they are each
  uniform; the sum reveals nothing more) and names who is in the sum.
* ``unmask``: which neighbours survived and which dropped in; its shares of their secrets out.

A client that fails at any stage (no rows, a training error) is left out from there on: the
protocol treats it as a dropout. Payloads travel as JSON with bytes in base64 (never pickle: a
client must not unpickle what a server sends).
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.identity import client_key
from clients.local_update import local_update
from fedpriv import updates
from fedpriv.client_state import ClientStateStore, safe_name
from fedpriv.config import RunConfig
from fedpriv.privacy.distributed import DistributedPlan, encode
from fedpriv.secagg import SecAggClient, SecAggParams, from_json, pack, to_json
from fedpriv.task import load_client_data, new_model

log = logging.getLogger("fedpriv.client")

STAGES = ("advertise", "share-keys", "masked-input", "unmask")


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """A model's travelling arrays as one vector, in the record's order (the server unflattens)."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays.values()])


def _noise_rng(rc: RunConfig, server_round: int, cid: int) -> np.random.Generator:
    """The client's own randomness for rounding and noise: unpredictable to the server (128 bits from
    the OS CSPRNG), or, with privacy.secure_rng=false, seeded (reproducible, NOT for release)."""
    if rc.privacy.secure_rng:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([rc.seed, server_round, cid, 0x5EC])


def secagg_stage(rc: RunConfig, cfg: ConfigRecord, arrays: ArrayRecord, node_config: dict[str, Any],
                 store: ClientStateStore) -> RecordDict:
    """Answer one stage for the clients the message names (``client-ids`` or ``client-id``)."""
    stage, rnd = str(cfg["secagg-stage"]), int(cfg["server-round"])
    params = SecAggParams(**json.loads(str(cfg["secagg-params"])))
    payload = from_json(json.loads(str(cfg["secagg-payload"]))) if "secagg-payload" in cfg else {}
    ids = [int(c) for c in cfg["client-ids"]] if "client-ids" in cfg else [int(cfg["client-id"])]
    out: dict[int, Any] = {}
    done, failed = [], 0
    total = None
    if stage == "masked-input":
        plan = DistributedPlan(**json.loads(str(cfg["secagg-plan"])))
        received = {k: v.copy() for k, v in updates.from_record(arrays).items()}
        global_state, model = arrays.to_torch_state_dict(), new_model(rc)
        total = np.zeros(plan.padded, dtype=np.int64)
    for cid in ids:
        key = client_key(rc.client_mode, cid, node_config)
        state_key = f"secagg-{cfg['run-id']}-round-{rnd}-{key}"
        try:
            if stage == "advertise":
                for stale in store.directory.glob(f"secagg-*-{safe_name(key)}.json"):  # a round it dropped out of
                    stale.unlink(missing_ok=True)
                client = SecAggClient(cid, params)
                out[cid] = client.advertise()
            else:
                state = store.load(state_key)
                if state is None:
                    raise RuntimeError(f"no secure-aggregation state for round {rnd} (an earlier stage was missed)")
                client = SecAggClient.from_state_dict(params, from_json(state))
            mine = payload.get(str(cid), {})
            if stage == "share-keys":
                out[cid] = client.share_keys({int(v): (k[0], k[1]) for v, k in mine.items()})
            elif stage == "masked-input":
                data = load_client_data(rc, cid, node_config)
                model.load_state_dict(global_state)
                new, metrics = local_update(rc, {"server-round": rnd}, data, model, store, key)
                problem = updates.update_problem(new, received)
                if problem is not None:
                    raise ValueError(f"model rejected: {problem}")
                vector = encode(flatten(updates.difference(new, received)), plan, int(cfg["secagg-rotation-seed"]),
                                _noise_rng(rc, rnd, cid))
                masked = client.masked_input({int(v): c for v, c in mine.items()}, vector)
                total = np.mod(total + masked, 1 << params.bits)
            elif stage == "unmask":
                out[cid] = client.unmask([int(v) for v in mine["survivors"]], [int(v) for v in mine["dropped"]])
            if stage == "unmask":
                store.path(state_key).unlink(missing_ok=True)  # the round's secrets are spent
            else:
                store.save(state_key, to_json(client.state_dict()))
            done.append(cid)
        except Exception as exc:  # noqa: BLE001 - one client's fault is a dropout, never the share's
            failed += 1
            log.info("client %d failed at secure-aggregation stage %s: %s: %s", cid, stage, type(exc).__name__, exc)
    shares = "client-ids" in cfg
    if not shares and failed:
        raise RuntimeError(f"secure-aggregation stage {stage} failed (see the client's log)")
    counts = ({"clients-trained": len(done), "clients-failed": failed, "clients-declined": 0, "clients-rejected": 0}
              if shares else {"declined": 0.0})  # the shapes fedpriv.engine.reply_counts reads
    content = RecordDict({
        "metrics": MetricRecord({**counts, "num-examples": float(len(done))}),
        "config": ConfigRecord({"secagg-stage": stage, "secagg-clients": done,
                                "secagg-payload": json.dumps(to_json(out))}),
    })
    if total is not None:
        content["arrays"] = ArrayRecord({"masked-sum": torch.from_numpy(pack(total, params.bits))})  # b bits each
    return content
