"""CUDA paths: device selection, training on the GPU, and the same epsilon as on the CPU.

These run only where a CUDA GPU is visible (they skip elsewhere, CI included); the project's
GPU check (``scripts/gpu_checks.sh``) runs them on a lent GPU machine. Each run goes through the
real round engine and ClientApp in-process (``conftest.InProcessGrid``), without Ray.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import InProcessGrid
from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.federation import run_federation
from fedpriv.task import pick_device

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to this process"),
              pytest.mark.usefixtures("flower_run_identity")]

QUIET = ["tracking.progress=false"]
CENTRAL = ["num_clients=8", "clients_per_round=4", "num_rounds=3", "privacy=central",
           "privacy.target_epsilon=4", *QUIET]
LOCAL = ["num_clients=4", "clients_per_round=4", "sampling=all", "num_rounds=2", "privacy=local",
         "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0", "train.batch_size=64",
         *QUIET]


NONPRIVATE = ["num_clients=8", "clients_per_round=4", "num_rounds=3", *QUIET]


def _run(overrides: list[str], run_dir) -> tuple[dict, dict | None]:
    summary = run_federation(InProcessGrid(2), compose_config(overrides + [f"run_dir={run_dir}"]))
    report = run_dir / run_folder.PRIVACY
    return summary, json.loads(report.read_text()) if report.exists() else None


def test_auto_picks_the_gpu():
    assert pick_device("auto") == "cuda"
    assert pick_device("cuda") == "cuda"
    assert pick_device("cpu") == "cpu"


@pytest.mark.parametrize("server_device", ["cpu", "cuda"])
def test_central_dp_on_the_gpu_trains_and_spends_what_the_cpu_run_spends(tmp_path, server_device):
    torch.cuda.reset_peak_memory_stats()
    gpu, gpu_report = _run(CENTRAL + ["device=cuda", f"placement.server_device={server_device}"], tmp_path / "gpu")
    assert torch.cuda.max_memory_allocated() > 0  # the clients' training really ran on the GPU
    cpu, cpu_report = _run(CENTRAL + ["device=cpu"], tmp_path / "cpu")
    assert gpu["epsilon"] == pytest.approx(cpu["epsilon"], rel=1e-12)  # the plan does not depend on the device
    assert gpu_report["epsilon"] == cpu_report["epsilon"]


def test_training_on_the_gpu_learns_what_it_learns_on_the_cpu(tmp_path):
    gpu, _ = _run(NONPRIVATE + ["device=cuda", "placement.server_device=cuda"], tmp_path / "gpu")
    cpu, _ = _run(NONPRIVATE + ["device=cpu"], tmp_path / "cpu")
    assert cpu["final_accuracy"] > 0.5  # digits, 10 classes, 3 rounds: the run learns
    assert abs(gpu["final_accuracy"] - cpu["final_accuracy"]) < 0.05  # same seeds; kernels differ slightly


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_sgd_on_the_gpu_spends_what_the_cpu_run_spends(tmp_path, mode):
    gpu, _ = _run(LOCAL + ["device=cuda", f"privacy.local.grad_sample_mode={mode}"], tmp_path / "gpu")
    cpu, _ = _run(LOCAL + ["device=cpu", f"privacy.local.grad_sample_mode={mode}"], tmp_path / "cpu")
    assert gpu["local_epsilon_max"] == pytest.approx(cpu["local_epsilon_max"], rel=1e-12)
    assert gpu["final_accuracy"] > 0.3
