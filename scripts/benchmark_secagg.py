"""What distributed DP with secure aggregation costs a round, against central DP on the same clients.

    python scripts/benchmark_secagg.py                           # 50 and 200 clients; 0, 1 and 10% dropouts
    python scripts/benchmark_secagg.py --clients 100 --dropouts 0 5 --dataset fashion_mnist

One round of ``privacy=distributed`` (every client sampled, ``sampling=all``) runs in this process: the
server's four SecAgg+ exchanges (``strategies.distributed_dp``) and every client's answer to each
(``clients.secagg_share``, the code a worker or a SuperNode runs), one client after another on one
core. Dropouts leave after sharing their secrets and before sending a masked input, the case whose
recovery costs the most (the survivors reveal shares of their pairwise mask keys). The same clients
then run a central DP round (the same local training, the server's clip and Gaussian noise).

Printed per case: seconds of the whole round and of its parts (local training, the clients' secure
aggregation and encoding, the server's), and the bytes each client downloads and uploads, counted
as Flower serialises the messages (``message_to_proto``). On a real deployment the clients' work runs
in parallel, one client per device: the per-client figure is what a device pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.common.serde import message_to_proto  # noqa: E402

import clients.secagg_share as secagg_share  # noqa: E402
from clients.local_update import local_update  # noqa: E402
from fedpriv import updates  # noqa: E402
from fedpriv.client_state import ClientStateStore  # noqa: E402
from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.task import encode_config, load_client_data, new_model  # noqa: E402
from strategies import build_aggregator  # noqa: E402


class Grid:
    """Enough of a Flower Grid for a strategy's begin_round."""

    def get_node_ids(self):
        return [1]


def _bytes(msg: Message) -> int:
    return message_to_proto(msg).ByteSize()


class Population:
    """The engine's population in this process: one message per client, answered by the client's own
    stage handler; ``lose`` never answer the masked-input stage. Counts time and bytes per stage."""

    uses_shares = False

    def __init__(self, rc, store_dir: Path, lose: set[int]):
        self.rc, self.store, self.lose = rc, ClientStateStore(store_dir), lose
        self.task = encode_config(rc)
        self.client_seconds = 0.0
        self.down = self.up = 0

    def messages(self, cohort, server_round, arrays, config):
        return [(Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
            {**config, "task": self.task, "server-round": server_round, "run-id": "bench", "client-id": int(c)})}),
            message_type=MessageType.TRAIN, dst_node_id=int(c) + 1), 1) for c in cohort]

    def dispatch(self, messages):
        replies, missing = [], 0
        for msg, _ in messages:
            cfg = msg.content["config"]
            if str(cfg["secagg-stage"]) == "masked-input" and int(cfg["client-id"]) in self.lose:
                missing += 1
                continue
            self.down += _bytes(msg)
            start = time.perf_counter()
            content = secagg_share.secagg_stage(self.rc, cfg, msg.content["arrays"], {}, self.store)
            self.client_seconds += time.perf_counter() - start
            reply = Message(content, reply_to=msg)
            self.up += _bytes(reply)
            replies.append(reply)
        return replies, missing


class TimedTraining:
    """local_update with a stopwatch: the training both modes share."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return local_update(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _initial(rc):
    return updates.to_record({k: v.detach().numpy() for k, v in new_model(rc).state_dict().items()})


def distributed_round(overrides: list[str], n: int, dropped: int, work: Path) -> dict:
    rc = compose_config([*overrides, "privacy=distributed"])
    aggregator = build_aggregator(rc)
    arrays = _initial(rc)
    cohort = list(range(n))
    population = Population(rc, work / f"store-{n}-{dropped}", set(cohort[:dropped]))
    timed = TimedTraining()
    secagg_share.local_update = timed
    start = time.perf_counter()
    aggregator.begin_round(1, arrays, Grid())
    _, replies, missing = aggregator.exchange(population, 1, cohort, arrays, {})
    new, metrics = aggregator.aggregate(1, arrays, replies)
    total = time.perf_counter() - start
    secagg_share.local_update = local_update
    assert new is not None and metrics["secagg_released"] == 1.0 and metrics["secagg_survivors"] == n - dropped
    return {"mode": "distributed", "clients": n, "dropped": dropped, "round_s": total, "training_s": timed.seconds,
            "client_secagg_s": population.client_seconds - timed.seconds,
            "server_s": total - population.client_seconds,
            "down_per_client": population.down / n, "up_per_client": population.up / n,
            "dim": aggregator.plan.dim, "bits": aggregator.plan.bits}


def central_round(overrides: list[str], n: int, work: Path) -> dict:
    rc = compose_config([*overrides, "privacy=central", "privacy.clipping=fixed"])
    aggregator = build_aggregator(rc)
    arrays = _initial(rc)
    store = ClientStateStore(work / f"central-{n}")
    global_state = arrays.to_torch_state_dict()
    model = new_model(rc)
    down = up = 0
    replies = []
    train_s = 0.0
    start = time.perf_counter()
    config = aggregator.begin_round(1, arrays, Grid())
    task = encode_config(rc)  # what the engine puts in every message, as in Population below
    for c in range(n):
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
            {**config, "task": task, "server-round": 1, "client-id": c})}), message_type=MessageType.TRAIN,
            dst_node_id=c + 1)
        down += _bytes(msg)
        t0 = time.perf_counter()
        model.load_state_dict(global_state)
        new, metrics = local_update(rc, {"server-round": 1}, load_client_data(rc, c), model, store, str(c))
        train_s += time.perf_counter() - t0
        reply = Message(RecordDict({"arrays": updates.to_record(new),
                                    "metrics": MetricRecord({"num-examples": float(metrics.get("num_examples", 1))})}),
                        reply_to=msg)
        up += _bytes(reply)
        replies.append(reply)
    t0 = time.perf_counter()
    new_arrays, _ = aggregator.aggregate(1, arrays, replies)
    server_s = time.perf_counter() - t0
    assert new_arrays is not None
    return {"mode": "central", "clients": n, "dropped": 0, "round_s": time.perf_counter() - start,
            "training_s": train_s, "client_secagg_s": 0.0, "server_s": server_s,
            "down_per_client": down / n, "up_per_client": up / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0, 1, 0.1],
                    help="clients lost after sharing their secrets: a count (>= 1) or a fraction (< 1)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Flower builds messages in a run
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)  # the wrapped strategy's per-round lines
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = [f"dataset={args.dataset}", "num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=1",
                "privacy.target_epsilon=8", "train.local_epochs=1"]
        central_round(warm, 4, Path(tmp) / "warm")  # imports, data and model caches: not any case's cost
        distributed_round(warm, 4, 0, Path(tmp) / "warm")
        for n in args.clients:
            overrides = [f"dataset={args.dataset}", f"num_clients={n}", f"clients_per_round={n}", "sampling=all",
                         "num_rounds=1", "privacy.target_epsilon=8", "train.local_epochs=1"]
            for rep in range(args.repeats):
                rows.append(central_round(overrides, n, Path(tmp) / f"r{rep}"))
                for d in args.dropouts:
                    k = int(d) if d >= 1 else int(round(d * n))
                    rows.append(distributed_round(overrides, n, k, Path(tmp) / f"r{rep}"))
    print(f"{'mode':12} {'clients':>7} {'dropped':>7} {'round s':>8} {'training':>8} {'client SA':>9} "
          f"{'server':>7} {'s/client':>8} {'KiB down':>8} {'KiB up':>7}")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["clients"], r["dropped"]), []).append(r)
    for (mode, n, k), rs in groups.items():
        med = {key: statistics.median(r[key] for r in rs) for key in
               ("round_s", "training_s", "client_secagg_s", "server_s", "down_per_client", "up_per_client")}
        per_client = (med["training_s"] + med["client_secagg_s"]) / n
        print(f"{mode:12} {n:7d} {k:7d} {med['round_s']:8.2f} {med['training_s']:8.2f} {med['client_secagg_s']:9.2f} "
              f"{med['server_s']:7.2f} {per_client:8.3f} {med['down_per_client'] / 1024:8.1f} "
              f"{med['up_per_client'] / 1024:7.1f}")
    dist = [r for r in rows if r["mode"] == "distributed"]
    if dist:
        print(f"model: {dist[0]['dim']:,} numbers, {dist[0]['bits']} bits; one core, clients one after another")


if __name__ == "__main__":
    main()
