"""Preflight knows everything a client will need: what would fail in every client after Ray
started is refused in one line before any work; what would run but not learn is a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedpriv.preflight as preflight_module
from fedpriv.compose import compose_config
from fedpriv.errors import ConfigError, UserError
from fedpriv.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["privacy=local", "num_clients=10", "clients_per_round=5", "num_rounds=3"]


def refused(overrides: list[str], tmp_path) -> str:
    rc = compose_config(overrides + [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError) as info:
        preflight(rc)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides, key", [
    (LOCAL + ["privacy.local.clipping=per_layer", "privacy.local.grad_sample_mode=ghost"], "privacy.local.clipping"),
    (LOCAL + ["privacy.local.target_epsilon=1e-6"], "privacy.local.target_epsilon"),
    (LOCAL + ["privacy.local.expected_rounds=-3"], "privacy.local.expected_rounds"),
    (LOCAL + ["privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=-1"], "privacy.local.noise_multiplier"),
    (["partition=shard", "partition.shards_per_client=400"], "partition"),
    (["partition=dirichlet", "partition.alpha=0.001", "num_clients=100", "clients_per_round=10"], "partition"),
])
def test_what_every_client_would_fail_on_is_refused_before_any_work(overrides, key, tmp_path):
    assert key in refused(overrides, tmp_path)


def test_cuda_on_a_machine_without_a_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight_module, "visible_gpus", lambda: 0)
    assert "device" in refused(["device=cuda"], tmp_path)
    monkeypatch.setattr(preflight_module, "visible_gpus", lambda: 1)
    rc = compose_config(["device=cuda", f"run_dir={tmp_path / 'ok'}"])
    assert preflight(rc) == []  # fine where a GPU exists


def test_a_natural_partition_must_have_as_many_clients_as_the_data_set(tmp_path, data_dir):
    message = refused(["dataset=heart_disease", "partition=natural", "num_clients=6", "clients_per_round=2",
                       f"data.root={data_dir}"], tmp_path)
    assert "num_clients" in message or "natural" in message


def test_a_budget_that_drowns_the_model_is_a_warning(tmp_path):
    tiny = compose_config(["privacy=central", "privacy.target_epsilon=0.05", "num_clients=20", "clients_per_round=10",
                           f"run_dir={tmp_path / 'tiny'}"])
    warnings = preflight(tiny)
    assert len(warnings) == 1 and "noise multiplier" in warnings[0] and "\n" not in warnings[0]
    fine = compose_config(["privacy=central", "privacy.target_epsilon=8", "num_clients=20", "clients_per_round=10",
                           f"run_dir={tmp_path / 'fine'}"])
    assert preflight(fine) == []


def test_simulate_refuses_a_client_failure_in_one_line_before_ray(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), *LOCAL, "privacy.local.clipping=per_layer",
         "privacy.local.grad_sample_mode=ghost", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("fedpriv: error:")]
    assert len(errors) == 1 and "privacy.local.clipping" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_error_hierarchy_keeps_config_errors_user_errors():
    assert issubclass(ConfigError, UserError)
