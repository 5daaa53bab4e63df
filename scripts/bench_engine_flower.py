"""Flower's built-in central DP in scripts/benchmark_engine.py: FedAvg wrapped by
DifferentialPrivacyServerSideFixedClipping, on Flower's Ray simulation engine.

    python scripts/bench_engine_flower.py WORKLOAD_JSON RESULT_JSON NUM_SUPERNODES

One SuperNode per client (node ``partition-id`` i acts as client i, the same IID rows as the other
two implementations). FedAvg samples exactly ``fraction_train * nodes`` nodes a round (50 of
1,000: fixed-size sampling, not Poisson). The wrapper clips each reply's update to C, FedAvg
averages them (equal weights: every client has 60 rows, so mean = sum / 50) and the wrapper adds
noise of std z*C/50. Rounds are timed by ``evaluate_fn``, which Flower calls before round 1 and
after each round; it evaluates the model only after the last one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.simulation import run_simulation

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine_common import (
    Workload,
    client_rows,
    generator_for,
    local_train,
    new_model,
    now,
    test_accuracy,
    write_result,
)

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    w = Workload.from_json(str(cfg["workload"]))
    client_id = int(context.node_config["partition-id"])
    model = new_model(w)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = client_rows(w, client_id)
    loss = local_train(model, x, y, w, generator_for(w, int(cfg["server-round"]), client_id))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(x), "train_loss": loss})})
    return Message(content, reply_to=msg)


def make_server_app(w: Workload, num_nodes: int, result_path: str) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        fedavg = FedAvg(fraction_train=w.cohort / num_nodes, fraction_evaluate=0.0, min_train_nodes=w.cohort,
                        min_available_nodes=num_nodes)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            fedavg, noise_multiplier=w.noise_multiplier, clipping_norm=w.clip_norm, num_sampled_clients=w.cohort)
        round_ends: list[float] = []
        final = {"accuracy": float("nan")}

        def timer(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            round_ends.append(now())
            if server_round == w.rounds:
                model = new_model(w)
                model.load_state_dict(arrays.to_torch_state_dict())
                final["accuracy"] = test_accuracy(model, w)
            return None

        strategy.start(grid=grid, initial_arrays=ArrayRecord(new_model(w).state_dict()), num_rounds=w.rounds,
                       train_config=ConfigRecord({"workload": w.to_json()}), evaluate_fn=timer)
        write_result(result_path, round_ends, final["accuracy"], num_supernodes=num_nodes,
                     note=f"fixed-size sampling: exactly {w.cohort} of {num_nodes} nodes")

    return server_app


def run(w: Workload, result_path: str, num_nodes: int) -> None:
    torch.set_num_threads(1)
    here = str(Path(__file__).resolve().parent)  # Ray's workers import bench_engine_common from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    run_simulation(
        server_app=make_server_app(w, num_nodes, result_path),
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )


if __name__ == "__main__":
    run(Workload.from_json(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
