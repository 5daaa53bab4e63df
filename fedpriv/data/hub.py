"""The Hugging Face hub, fallback source of the image data sets: is it reachable, fetch, cache.

Off when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set or a TCP connect gets no answer in time.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .base import DataError
from .cache import cached_arrays, lookup_cached, source_key
from .locate import not_found

HUB_CONNECT_TIMEOUT = 3.0

# (cache entry folder, {"train"|"test": (uint8 images, int64 labels)}, per_channel) -> None
ImageWriter = Callable[[Path, dict[str, tuple[np.ndarray, np.ndarray]], bool], None]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unavailable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now, or ``None`` if it answers."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:  # in a thread: the DNS lookup has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot reach {host}:{port} ({exc})")

    thread = threading.Thread(target=probe, name="fedpriv-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_CONNECT_TIMEOUT + 0.5)
    if not outcome:
        return f"no answer from {host}:{port} within {HUB_CONNECT_TIMEOUT:g} s"
    return outcome[0]


def hub_images(repo: str, image_column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"test": (uint8 images (N, H, W[, C]), int64 labels)}`` from the hub."""
    try:
        import datasets

        dsd = datasets.load_dataset(repo)
        out = {}
        for split in ("train", "test"):
            part = dsd[split]
            images = np.stack([np.asarray(im, dtype=np.uint8) for im in part[image_column]])
            out[split] = (images, np.asarray(part["label"], dtype=np.int64))
        return out
    except Exception as exc:  # network, auth, schema: one clear line
        raise DataError(f"downloading {repo} from the Hugging Face hub failed: {exc}") from exc


def _hub_build(repo: str, image_column: str, per_channel: bool, write: ImageWriter) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        splits = hub_images(repo, image_column)
        write(out, splits, per_channel)
        return {"source": f"hf:{repo}"}

    return build


def from_hub_or_fail(name: str, what: str, notes: list[str], repo: str, column: str,
                     per_channel: bool, write: ImageWriter) -> dict[str, np.ndarray]:
    """Arrays fetched from the hub (once, then cached), or the not-found ``DataError``.

    ``write`` stores the fetched splits as the cache entry's normalised arrays.
    """
    key = source_key(f"{name}/hub/1", repo, column, per_channel)
    cached = lookup_cached(name, key)  # fetched earlier: serve it, no network needed
    if cached is not None:
        return cached[0]
    reason = hub_unavailable_reason()
    if reason is not None:
        raise not_found(what, notes, hub=reason)
    arrays, _ = cached_arrays(name, key, _hub_build(repo, column, per_channel, write))
    return arrays
