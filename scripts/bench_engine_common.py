"""What the three implementations of scripts/benchmark_engine.py share: the workload, the data of
one client, the model, one client's local training with its clipped update, the final evaluation.

The floor and the Flower baseline use these functions; fedpriv runs its own code on the same
settings (the same IID split: fedpriv's ``partition_indices(ds, "iid", 1000, seed)`` with no
validation rows, the same model builder, plain SGD with the same batch size and learning rate).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpriv.data import load_dataset, partition_indices
from fedpriv.models import build_model, count_parameters

DATA_ROOT = "/work/shared/data"


@dataclass(frozen=True)
class Workload:
    rounds: int = 30
    num_clients: int = 1000
    cohort: int = 50  # expected cohort (Poisson q = cohort / num_clients), or exact under Flower
    batch_size: int = 10
    lr: float = 0.05
    local_epochs: int = 1
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    width: int = 32  # SmallCNN's first-block channels (32: fedpriv's default CNN)
    seed: int = 0
    data_root: str = DATA_ROOT

    @property
    def q(self) -> float:
        return self.cohort / self.num_clients

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Workload:
        return Workload(**json.loads(text))


def dataset(w: Workload):
    """Fashion-MNIST, memory-mapped from fedpriv's cache (shared by every process's page cache)."""
    return load_dataset("fashion_mnist", w.data_root)


def client_rows(w: Workload, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``client_id``'s training rows (copies), as fedpriv gives them with ``val_fraction=0``."""
    ds = dataset(w)
    idx = np.sort(partition_indices(ds, "iid", w.num_clients, w.seed)[client_id])
    return np.asarray(ds.x_train[idx], dtype=np.float32), np.asarray(ds.y_train[idx], dtype=np.int64)


def new_model(w: Workload) -> nn.Module:
    ds = dataset(w)
    return build_model("cnn", task=ds.task, input_shape=ds.input_shape, num_classes=ds.num_classes,
                       width=w.width, seed=w.seed)


def num_parameters(w: Workload) -> int:
    return count_parameters(new_model(w))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    state, offset = model.state_dict(), 0
    with torch.no_grad():
        for v in state.values():
            v.copy_(flat[offset : offset + v.numel()].view_as(v))
            offset += v.numel()


def local_train(model: nn.Module, x: np.ndarray, y: np.ndarray, w: Workload, generator: torch.Generator) -> float:
    """Plain SGD on (x, y), in place; returns the mean training loss."""
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=w.lr)
    total, steps = 0.0, 0
    for _ in range(w.local_epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), w.batch_size):
            idx = order[start : start + w.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1)


def clipped_update(model: nn.Module, start: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """(the trained model minus ``start``, scaled to L2 norm <= clip_norm; the unclipped norm)."""
    delta = flat_params(model).double() - start.double()
    norm = float(delta.norm())
    return delta * min(1.0, clip_norm / max(norm, 1e-12)), norm


def generator_for(w: Workload, server_round: int, client_id: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((w.seed * 1_000_003 + server_round) * 1_000_033 + client_id)
    return g


@torch.no_grad()
def test_accuracy(model: nn.Module, w: Workload) -> float:
    ds = dataset(w)
    model.eval()
    correct = 0
    for start in range(0, len(ds.x_test), 1000):
        xb = torch.from_numpy(np.array(ds.x_test[start : start + 1000], dtype=np.float32))
        correct += int((model(xb).argmax(1) == torch.from_numpy(np.asarray(ds.y_test[start : start + 1000]))).sum())
    return correct / len(ds.x_test)


def write_result(path: str | Path, round_ends: list[float], accuracy: float, **extra) -> None:
    """The child's report to the benchmark: absolute end time of each round, final accuracy."""
    Path(path).write_text(json.dumps({"round_ends": round_ends, "accuracy": accuracy, **extra}))


def now() -> float:
    return time.time()
