"""The ClientApp: everything it needs arrives in the message (config, which client to act as).

A train message carries ``arrays`` (the global model) and ``config`` with ``task`` (the run's
configuration as JSON), ``server-round``, ``run-id`` and any per-round values the server's strategy
adds (for example the clip norm). In deployment it names one client (``client-id``: the SuperNode
is that client); in simulation it names a worker's share of the cohort (``client-ids``, ``share``),
trained one client after another (:mod:`clients.cohort`). A failure becomes an error reply that the
server counts; it never stalls the round.
"""

from __future__ import annotations

import logging
import traceback

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.analytics import ShareValidation, answer_query
from clients.cohort import train_share
from clients.identity import client_key
from clients.local_update import run_local_update
from clients.secagg_share import secagg_stage
from fedpriv import fault_gate
from fedpriv.analytics import QUERY_KEY
from fedpriv.client_state import ClientStateStore, node_state_dir
from fedpriv.config import RunConfig
from fedpriv.task import EmptyPartition, dataset_for, decode_config, load_client_data, new_model

log = logging.getLogger("fedpriv.client")
app = ClientApp()

ERROR_EMPTY = 10
ERROR_CLIENT = 11


def warm_up(task: str) -> None:
    """Load the run's data set and build its model before the first message (fedpriv.worker_pool)."""
    try:
        rc = decode_config(task)
        dataset_for(rc)
        new_model(rc)
    except Exception as exc:  # noqa: BLE001 - round 1 meets the same fault and reports it for its clients
        log.warning("a client worker could not warm up (%s: %s); its first round will try again", type(exc).__name__, exc)


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _setup(msg: Message, context: Context):
    cfg = msg.content["config"]
    rc = decode_config(str(cfg["task"]))
    client_id = int(cfg["client-id"])
    torch.set_num_threads(1)
    data = load_client_data(rc, client_id, dict(context.node_config))
    model = new_model(rc)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return rc, cfg, data, model


def client_store(rc: RunConfig, cfg: ConfigRecord, node_config: dict) -> ClientStateStore:
    """The client's own state folder: the simulated clients' disk the server names in simulation,
    the SuperNode's ``state-dir`` in deployment (one ledger across runs: not chosen by the server)."""
    if rc.client_mode == "virtual":
        return ClientStateStore(str(cfg["client-state-dir"]))
    return ClientStateStore(node_state_dir(node_config))


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    if QUERY_KEY in msg.content["config"]:
        return query_handler(msg, context)
    if "secagg-stage" in msg.content["config"]:
        return secagg_handler(msg, context)
    if "client-ids" in msg.content["config"]:
        return share_handler(msg, context)
    try:
        rc, cfg, data, model = _setup(msg, context)
        fault_gate.hold(int(cfg["server-round"]))  # a no-op unless a fault test set it
        node_config = dict(context.node_config)
        key = client_key(rc.client_mode, int(cfg["client-id"]), node_config)
        store = client_store(rc, cfg, node_config)
        validation = ShareValidation(rc, int(cfg["server-round"]), store)  # analytics, if due this round
        validation.add(model, data, key)  # the incoming global model on its held-out rows, before training
        arrays, metrics = run_local_update(rc, cfg, data, model, store, key)
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
        if validation.due:
            content["analytics"] = validation.record()
        if rc.privacy.mode in ("local", "central_local"):  # who reports this ledger (the server's table)
            content["client"] = ConfigRecord({"key": key})
        return Message(content, reply_to=msg)
    except EmptyPartition as exc:
        return _error_reply(msg, ERROR_EMPTY, f"empty: {exc}")
    except Exception as exc:  # noqa: BLE001 - any client fault is reported, never raised into the engine
        log.warning("client failed: %s", traceback.format_exc())
        return _error_reply(msg, ERROR_CLIENT, f"{type(exc).__name__}: {exc}")


def query_handler(msg: Message, context: Context) -> Message:
    """An analytics query before training (clients.analytics): bounded figures, no training."""
    try:
        cfg = msg.content["config"]
        rc, node_config = decode_config(str(cfg["task"])), dict(context.node_config)
        return Message(answer_query(rc, cfg, node_config, client_store(rc, cfg, node_config)), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - reported, never raised into the engine
        log.warning("analytics query failed: %s", traceback.format_exc())
        return _error_reply(msg, ERROR_CLIENT, f"{type(exc).__name__}: {exc}")


def share_handler(msg: Message, context: Context) -> Message:
    """Simulation: a share of the cohort in one message (:mod:`clients.cohort`)."""
    try:
        cfg = msg.content["config"]
        rc = decode_config(str(cfg["task"]))
        torch.set_num_threads(1)
        fault_gate.hold(int(cfg["server-round"]))  # a no-op unless a fault test set it
        node_config = dict(context.node_config)
        import time as _t; _t0 = _t.time()
        content = train_share(rc, cfg, msg.content["arrays"], node_config, client_store(rc, cfg, node_config))
        content["timing"] = MetricRecord({"t0": _t0, "t1": _t.time(), "n": len(cfg["client-ids"])})
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - the whole share failed: the server counts all its clients
        log.warning("share failed: %s", traceback.format_exc())
        return _error_reply(msg, ERROR_CLIENT, f"{type(exc).__name__}: {exc}")


def secagg_handler(msg: Message, context: Context) -> Message:
    """privacy=distributed: one stage of secure aggregation for one client or a share (clients.secagg_share)."""
    try:
        cfg = msg.content["config"]
        rc = decode_config(str(cfg["task"]))
        torch.set_num_threads(1)
        node_config = dict(context.node_config)
        arrays = msg.content["arrays"] if "arrays" in msg.content else None
        content = secagg_stage(rc, cfg, arrays, node_config, client_store(rc, cfg, node_config))
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - the server counts the stage's clients as dropped
        log.warning("secure-aggregation stage failed: %s", traceback.format_exc())
        return _error_reply(msg, ERROR_CLIENT, f"{type(exc).__name__}: {exc}")
