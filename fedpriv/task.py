"""What a client and the server share: the model for a data set and a client's rows.

Like Flower's quickstart task module: the apps stay thin shells over these functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpriv.anonymisation.rows import anonymised_rows
from fedpriv.audit.exposure import Secrets, draw_secrets, secret_space
from fedpriv.config import RunConfig, from_dict, to_dict
from fedpriv.data import (
    FederatedDataset,
    SyntheticDataset,
    client_split,
    load_dataset,
    partition_indices,
    synthetic_dataset,
)
from fedpriv.data.sources import RETOKENISABLE
from fedpriv.errors import ClientError, ConfigError
from fedpriv.language_model import (
    LanguageModelSpec,
    check_tokenizer_fits,
    new_language_model,
    pretrained_tokenizer,
)
from fedpriv.models import build_model
from fedpriv.pretraining import PUBLIC, public_checkpoint



@dataclass
class ClientData:
    client_id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


class EmptyPartition(ClientError):
    """A client with no training rows: reported in the round's metrics, not a crash."""


def encode_config(rc: RunConfig) -> str:
    """The run's configuration as it travels inside a message (clients hold no config files)."""
    return json.dumps(to_dict(rc), sort_keys=True)


@lru_cache(maxsize=8)
def decode_config(text: str) -> RunConfig:
    return from_dict(json.loads(text))


def dataset_for(rc: RunConfig) -> FederatedDataset:
    if rc.dataset.name == "synthetic":  # generated per client on demand: its parameters are the run's
        return synthetic_dataset(rc.dataset.alpha, rc.dataset.beta, rc.seed, rc.num_clients, rc.dataset.iid)
    return load_dataset(rc.dataset.name, rc.data.root, tokenizer=_checkpoint_tokenizer(rc))


def _checkpoint_tokenizer(rc: RunConfig) -> str | None:
    """A pretrained language model's own tokenizer, for the data sets that are tokenised with it."""
    if not (is_language_model(rc) and rc.model.pretrained and rc.dataset.name in RETOKENISABLE):
        return None
    if rc.model.pretrained == PUBLIC:  # made with the data set's own default tokenizer
        return None
    return pretrained_tokenizer(rc.model.pretrained)


def is_language_model(rc: RunConfig) -> bool:
    return rc.model.name == "transformer" or (rc.model.name == "auto" and rc.dataset.name in RETOKENISABLE)


def language_model_spec(rc: RunConfig, ds: FederatedDataset) -> LanguageModelSpec:
    m = rc.model
    if ds.task not in ("text_classification", "next_char"):
        raise ConfigError(f"config key 'model.name': transformer needs a text data set (sent140, shakespeare); "
                          f"{rc.dataset.name} is {ds.task}")
    pretrained = m.pretrained
    if pretrained == PUBLIC:  # the data set's public checkpoint, pretrained once per machine and cached
        pretrained = str(public_checkpoint(rc.dataset.name, rc.data.root, layers=m.layers, dim=m.dim, heads=m.heads))
    return LanguageModelSpec(
        task=ds.task, vocab_size=int(ds.vocab_size), seq_len=int(ds.input_shape[0]), num_classes=ds.num_classes,
        pretrained=pretrained, layers=m.layers, dim=m.dim, heads=m.heads, finetune=m.finetune,
        lora_rank=m.lora_rank, lora_alpha=float(m.lora_alpha), lora_targets=tuple(m.lora_targets), seed=rc.seed,
        dtype=m.dtype, loss_positions=m.loss_positions,
    )


def partition_params(rc: RunConfig) -> dict[str, Any]:
    p = rc.partition
    return {
        "dirichlet": {"alpha": p.alpha},
        "pathological": {"classes_per_client": p.classes_per_client},
        "shard": {"shards_per_client": p.shards_per_client},
    }.get(p.scheme, {})


def client_partition(rc: RunConfig, client_id: int, num_clients: int | None = None) -> np.ndarray:
    ds = dataset_for(rc)
    n = num_clients or rc.num_clients
    parts = partition_indices(ds, rc.partition.scheme, n, rc.seed, **partition_params(rc))
    if not 0 <= client_id < len(parts):
        raise ValueError(f"client {client_id} does not exist: the partition has {len(parts)} clients")
    return parts[client_id]


def load_client_data(rc: RunConfig, client_id: int, node_config: dict[str, Any] | None = None) -> ClientData:
    """The rows client ``client_id`` trains and validates on.

    In deployment a SuperNode's ``--node-config`` decides: ``data-path=...`` (an ``.npz`` with
    ``x_train``, ``y_train`` and optionally ``x_val``, ``y_val``: the owner's own files) or
    ``partition-id=... num-partitions=...`` (a part of a shared data set).
    """
    node_config = node_config or {}
    if "data-path" in node_config:
        if rc.anonymisation.enabled:
            raise ValueError("anonymisation runs on the shared data set's raw columns; a data-path file is the "
                             "owner's own: export it anonymised (deploy export-data with anonymisation=...) and "
                             "run with anonymisation=none")
        return _load_owner_file(Path(str(node_config["data-path"])), client_id)
    if rc.client_mode == "nodes" and "partition-id" not in node_config:
        # One node = one client: a node that names no data must not train on someone else's part.
        raise ValueError(
            "this SuperNode's --node-config names no data: give data-path=\"/abs/file.npz\" "
            "or partition-id=I num-partitions=N"
        )
    num_clients = None
    if "partition-id" in node_config and rc.client_mode == "nodes":
        client_id = int(node_config["partition-id"])
        num_clients = int(node_config.get("num-partitions", rc.num_clients))
    ds = dataset_for(rc)
    if isinstance(ds, SyntheticDataset):  # one client's rows, generated from (seed, client id) alone
        x, y = ds.client_rows(client_id)
        tr, va = client_split(np.arange(len(y)), rc.data.val_fraction, rc.seed, client_id)
        return ClientData(client_id, x[tr], y[tr], x[va], y[va])
    idx = client_partition(rc, client_id, num_clients)
    if len(idx) == 0:
        raise EmptyPartition(f"client {client_id} has an empty partition ({rc.partition.scheme})")
    tr, va = client_split(idx, rc.data.val_fraction, rc.seed, client_id)
    tr, va = np.sort(tr), np.sort(va)
    if rc.anonymisation.enabled:  # the client's own rows, k-anonymised before it trains on them
        x_tr, y_tr, x_va, y_va = anonymised_rows(rc, ds, tr, va)
        if len(x_tr) == 0:
            raise EmptyPartition(f"client {client_id} has no training rows left after anonymisation")
        return ClientData(client_id, x_tr, y_tr, x_va, y_va)
    return _with_secrets(rc, ClientData(client_id, ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va]))


def secrets_for(rc: RunConfig) -> Secrets | None:
    """The run's planted and held-out secrets (``exposure.secrets``; the same in every process), or None."""
    if rc.exposure.secrets == 0:
        return None
    return _secrets(encode_config(rc))


@lru_cache(maxsize=2)
def _secrets(text: str) -> Secrets:
    rc = decode_config(text)
    ds = dataset_for(rc)
    space = secret_space(ds.task, ds.tokenizer, int(ds.input_shape[0]), ds.num_classes, rc.exposure.length)
    return draw_secrets(space, rc.exposure.secrets, rc.exposure.repeats, rc.num_clients, rc.seed)


def _with_secrets(rc: RunConfig, data: ClientData) -> ClientData:
    """A holder's training rows with its planted secret's copies appended (they are part of its data: every
    DP figure of the run counts them); every other client's rows as they are."""
    secrets = secrets_for(rc)
    planted = secrets.rows_of(data.client_id) if secrets is not None else None
    if planted is None:
        return data
    x, y = planted
    return ClientData(data.client_id, np.concatenate([data.x_train, x.astype(data.x_train.dtype)]),
                      np.concatenate([data.y_train, y.astype(data.y_train.dtype)]), data.x_val, data.y_val)


def _load_owner_file(path: Path, client_id: int) -> ClientData:
    if not path.exists():
        raise FileNotFoundError(f"data-path {path} does not exist on this SuperNode")
    try:
        f = np.load(path)  # allow_pickle stays False: a data file never runs code
    except (OSError, ValueError) as exc:
        raise ValueError(f"data-path {path} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not hasattr(f, "files"):
        raise ValueError(f"data-path {path} is a single .npy array, not an .npz with x_train and y_train")
    with f:
        if "x_train" not in f or "y_train" not in f:
            raise ValueError(f"{path} must hold arrays x_train and y_train (has {sorted(f.files)})")
        x, y = f["x_train"].astype(np.float32), f["y_train"].astype(np.int64)
        xv = f["x_val"].astype(np.float32) if "x_val" in f else x[:0]
        yv = f["y_val"].astype(np.int64) if "y_val" in f else y[:0]
    if len(x) == 0:
        raise EmptyPartition(f"{path} holds no training rows")
    return ClientData(client_id, x, y, xv, yv)


def new_model(rc: RunConfig) -> nn.Module:
    """The global model's architecture, freshly initialised from the run's seed.

    A language model's frozen base is built once per process and shared (:mod:`fedpriv.language_model`);
    its state dict, what travels, is the adapters only.
    """
    ds = dataset_for(rc)
    if is_language_model(rc):
        spec = language_model_spec(rc, ds)
        if spec.pretrained:
            check_tokenizer_fits(spec, ds.tokenizer, pretrained_tokenizer(spec.pretrained))
        return new_language_model(spec)
    return build_model(
        rc.model.name,
        task=ds.task,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        vocab_size=ds.vocab_size,
        hidden=tuple(rc.model.hidden),
        width=rc.model.width,
        seed=rc.seed,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024, device: str = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.array(x[start : start + batch_size])).to(device)
        yb = torch.from_numpy(np.array(y[start : start + batch_size])).long().to(device)
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return loss_sum / len(x), correct / len(x)


def training_generator(seed: int, server_round: int, client_id: int) -> torch.Generator:
    """Batch order for one client in one round: deterministic for the run's seed."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + server_round) * 1_000_033 + client_id)
    return g


def pick_device(requested: str) -> str:
    """``auto``: a GPU when this process can see one; ``cuda`` without one is a clear error."""
    if requested == "cpu":
        return "cpu"
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise RuntimeError("device=cuda but no CUDA GPU is visible to this process")
    return "cuda" if has_gpu else "cpu"
