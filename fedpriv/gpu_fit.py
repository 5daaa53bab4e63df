"""Whether a language model's workers fit the GPUs they are placed on: refused in one line before Ray.

A LoRA worker holds its own copy of the frozen base (:func:`fedpriv.language_model.frozen_template`,
once per process), the adapters with their gradients and optimiser state, a CUDA context, and its
activations. Ray packs ``floor(1 / placement.num_gpus_per_client)`` workers on every GPU and does not
look at memory, so a placement that cannot fit would start, run out of memory in every worker, and end
with an untrained model. :func:`check_gpu_fit` refuses what surely cannot run: it counts only the
base, the adapters' float32 state and the CUDA context (activations come on top), so what it passes
may still be tight, what it refuses never fits. ``model.dtype=bfloat16`` halves the base and needs a
GPU with bfloat16 arithmetic (compute capability 8.0, Ampere, or newer).

No privacy meaning: where a worker runs changes no figure of the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpriv.errors import ConfigError

GIB = 1024 ** 3
CUDA_CONTEXT_BYTES = 300 * 1024 ** 2  # a PyTorch CUDA context with its kernels: 300-500 MiB; the low end
TRAINABLE_COPIES = 4  # weights, gradient, momentum, and one more for DP-SGD's clipped sum or the received model


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_bytes: int
    capability: tuple[int, int]


def visible_gpu_info() -> list[GpuInfo]:
    """The GPUs this process sees (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(GpuInfo(p.name, int(p.total_memory), (int(p.major), int(p.minor))))
    return out


def worker_bytes(base_bytes: int, trainable_numbers: int) -> int:
    """A lower bound on one worker's GPU memory (activations excluded)."""
    return base_bytes + TRAINABLE_COPIES * 4 * trainable_numbers + CUDA_CONTEXT_BYTES


def check_gpu_fit(*, dtype: str, workers_gpu_share: float, server_on_gpu: bool, base_bytes: int,
                  trainable_numbers: int, gpus: list[GpuInfo]) -> None:
    """Refuse a language-model placement the GPUs cannot hold, or a dtype they cannot compute in.

    ``workers_gpu_share``: ``placement.num_gpus_per_client`` (0: the workers stay on CPUs);
    ``server_on_gpu``: the server evaluates its own copy on GPU 0; ``base_bytes``: the frozen base in
    ``dtype``; ``trainable_numbers``: what trains (the adapters and a head).
    """
    if not gpus or (workers_gpu_share <= 0 and not server_on_gpu):
        return
    if dtype == "bfloat16":
        old = [g for g in gpus if g.capability < (8, 0)]
        if old:
            g = old[0]
            raise ConfigError(f"config key 'model.dtype': bfloat16 needs a GPU of compute capability 8.0 (Ampere) or "
                              f"newer; {g.name} is {g.capability[0]}.{g.capability[1]}; use model.dtype=float32")
    per_worker = worker_bytes(base_bytes, trainable_numbers)
    smallest = min(gpus, key=lambda g: g.total_bytes)
    workers = math.floor(1 / workers_gpu_share + 1e-9) if workers_gpu_share > 0 else 0
    need = (workers + int(server_on_gpu)) * per_worker  # the server shares GPU 0 with its workers
    if need > smallest.total_bytes:
        fit = max(smallest.total_bytes // per_worker - int(server_on_gpu), 0)
        hint = (f"at most {fit} workers fit (placement.num_gpus_per_client={1 / fit:.3g})" if fit
                else "not even one worker fits")
        half = "" if dtype == "bfloat16" else ", or model.dtype=bfloat16 to halve the base"
        raise ConfigError(
            f"config key 'placement.num_gpus_per_client': {workers_gpu_share:g} puts {workers} language-model workers"
            f"{' and the server' if server_on_gpu else ''} on each GPU, each holding the frozen base "
            f"({base_bytes / GIB:.2f} GiB in {dtype}), its adapters' state and a CUDA context: at least "
            f"{need / GIB:.1f} GiB, more than {smallest.name}'s {smallest.total_bytes / GIB:.1f} GiB; {hint}{half}")
