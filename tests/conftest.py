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


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApp handlers called in this process: the real round
    loop, messages and ClientApp, without Ray (fast enough for end-to-end checks of the loop).

    ``contexts`` are the nodes' Flower contexts; a new grid is a restarted simulation (every
    node's ``context.state`` is gone). ``tamper(reply) -> reply`` lets a test corrupt replies.
    """

    def __init__(self, num_nodes: int = 2, node_config: dict | None = None, tamper=None,
                 node_configs: list[dict] | None = None):
        from flwr.app import Context, RecordDict

        self.nodes = list(range(1, num_nodes + 1))
        configs = node_configs or [dict(node_config or {}) for _ in self.nodes]  # per node: a SuperNode's own
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(configs[i]), state=RecordDict(),
                                    run_config={}) for i, n in enumerate(self.nodes)}
        self.tamper = tamper
        self.sent = []
        self.waiting = {}  # message id -> its reply, until pull_messages takes it

    def get_node_ids(self):
        return list(self.nodes)

    pull_interval = 0.0  # replies are ready as soon as push_messages returns

    def push_messages(self, messages):
        """Grid.push_messages: runs each message's handler now; its reply waits for pull_messages."""
        import uuid

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid does
            (reply,) = self.send_and_receive([msg])
            self.waiting[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]

    def send_and_receive(self, messages, timeout=None):
        import fedpriv.client_app as client_app

        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = client_app.train_handler(msg, self.contexts[msg.metadata.dst_node_id])
            replies.append(self.tamper(reply) if self.tamper else reply)
        return replies
