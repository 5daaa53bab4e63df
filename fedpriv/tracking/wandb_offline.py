"""Read a W&B offline run folder (``wandb/offline-run-*``) back: config, history, summary.

wandb 0.31 no longer ships a Python reader for its ``.wandb`` transaction log (the old
``wandb.sdk.internal.datastore`` is gone; reading moved into the Go ``wandb-core``), and it no
longer writes ``files/wandb-summary.json`` for offline runs. The log itself is simple and stable:

- a 7-byte header: ``b":W&B"``, magic ``0xBEE1`` (little-endian), a version byte;
- then a LevelDB-style log: 32 KiB blocks of chunks, each with a 7-byte header
  (CRC-32 (little-endian) of type byte + payload, payload length (uint16 LE), type
  1 full / 2 first / 3 middle / 4 last); a block tail shorter than a header is zero padding;
- each reassembled payload is one ``wandb_internal.Record`` protobuf, decoded here with wandb's
  own generated classes (``wandb.proto.wandb_internal_pb2``).

The CLI equivalent is ``wandb leet inspect --json <run folder>`` (wandb >= 0.31).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """The file is not a readable wandb transaction log."""


def transaction_log(run_folder: str | Path) -> Path:
    """The ``run-<id>.wandb`` file of an offline run folder (or the file itself)."""
    p = Path(run_folder)
    if p.is_file():
        return p
    logs = sorted(p.glob("*.wandb"))
    if not logs:
        raise WandbLogError(f"no .wandb transaction log in {p}")
    return logs[0]


def is_offline_run_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and p.name.startswith(("offline-run-", "run-")) and any(p.glob("*.wandb"))


def iter_payloads(path: str | Path, verify: bool = True) -> Iterator[bytes]:
    """The raw record payloads of a transaction log, in order; stops at a torn or corrupt tail."""
    data = Path(path).read_bytes()
    if len(data) < 7 or data[:4] != HEADER_IDENT:
        raise WandbLogError(f"{path}: not a wandb transaction log")
    magic, version = struct.unpack("<HB", data[4:7])
    if magic != HEADER_MAGIC:
        raise WandbLogError(f"{path}: bad header magic {magic:#x}")
    verify = verify and version == 0  # version 0 uses zlib's CRC-32; others are not checked here
    pos, pending = 7, bytearray()
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block  # zero padding at the end of a block
            continue
        if pos + CHUNK_HEADER > len(data):
            return  # torn header at the end (a run still writing, or killed)
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block  # preallocated / zero-filled rest of the block
            continue
        start, end = pos + CHUNK_HEADER, pos + CHUNK_HEADER + length
        if end > len(data) or length > left_in_block - CHUNK_HEADER:
            return  # torn payload
        payload = data[start:end]
        if verify and zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            return  # corrupt: everything after it is unreliable
        pos = end
        if kind == FULL:
            pending.clear()
            yield bytes(payload)
        elif kind == FIRST:
            pending[:] = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            pending += payload
            yield bytes(pending)
            pending.clear()
        else:
            return


def iter_records(path: str | Path) -> Iterator[Any]:
    """``wandb_internal.Record`` messages of a ``.wandb`` file (wandb's protobuf classes)."""
    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415

    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def has_exit_record(path: str | Path) -> bool:
    """Whether the log already holds the run's exit record (wandb-core writes the tail a moment
    after ``run.finish()`` returns)."""
    try:
        return any(rec.WhichOneof("record_type") == "exit" for rec in iter_records(transaction_log(path)))
    except (OSError, WandbLogError):
        return False


def wait_until_complete(path: str | Path, timeout: float = 5.0) -> bool:
    """Poll (bounded) until the log holds its exit record; True if it does."""
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while True:
        if has_exit_record(path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _item_value(item: Any) -> Any:
    """A history/summary/config item's value: the typed form if present, else ``value_json``."""
    oneofs = item.DESCRIPTOR.oneofs_by_name
    if "value" in oneofs:
        which = item.WhichOneof("value")
        if which == "none":
            return None
        if which == "json":
            return _loads(item.json)
        if which is not None:
            return getattr(item, which)
    return _loads(item.value_json)


def _item_key(item: Any) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = target.get(k)
        if not isinstance(node, dict):
            node = target[k] = {}
        target = node
    target[keys[-1]] = value


def _del_nested(target: dict[str, Any], keys: list[str]) -> None:
    for k in keys[:-1]:
        target = target.get(k)  # type: ignore[assignment]
        if not isinstance(target, dict):
            return
    target.pop(keys[-1], None)


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # as logged (fedpriv logs dotted keys)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per step, with "_step"
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _apply_config(run: OfflineRun, cfg_record: Any) -> None:
    for item in cfg_record.update:
        _set_nested(run.config, _item_key(item), _item_value(item))
    for item in cfg_record.remove:
        _del_nested(run.config, _item_key(item))


def read_offline_run(run_folder: str | Path) -> OfflineRun:
    """Config, history (one dict per logged step) and final summary of an offline run folder."""
    path = transaction_log(run_folder)
    run = OfflineRun(path=Path(run_folder))
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.job_type = r.display_name, r.run_group, r.job_type
            run.tags = list(r.tags)
            _apply_config(run, r.config)
        elif kind == "config":
            _apply_config(run, rec.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                row[".".join(_item_key(item))] = _item_value(item)
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(run.summary, _item_key(item), _item_value(item))
            for item in rec.summary.remove:
                _del_nested(run.summary, _item_key(item))
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)
    summary_file = Path(run_folder) / "files" / "wandb-summary.json"
    if Path(run_folder).is_dir() and summary_file.exists():  # older wandb versions write it offline
        try:
            run.summary.update(json.loads(summary_file.read_text()))
        except (OSError, ValueError):
            pass
    return run
