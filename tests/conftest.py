"""Shared test fixtures: where the real data sets are, and small fast configurations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def shared_data_dir() -> Path | None:
    """``$FEDPRIV_DATA`` or ``../shared/data`` beside the project, if present."""
    for candidate in (os.environ.get("FEDPRIV_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None or not (d / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real data not found: set FEDPRIV_DATA to a folder with fashion-mnist/ (CI uses ../shared/data)")
    return d


class FakeGrid:
    """Enough of a Flower Grid for a strategy's configure_train outside a run: one node."""

    def get_node_ids(self):
        return [1]


@pytest.fixture
def flower_run_identity():
    """Flower builds messages only inside a run (a ServerApp sets this); pretend to be in one."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before
