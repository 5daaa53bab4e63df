"""What DP-SGD costs per training example, relative to plain SGD, for each Opacus grad_sample_mode.

    FEDPRIV_DATA=/work/shared/data PYTHONPATH=. python scripts/benchmark_dp_sgd.py
    python scripts/benchmark_dp_sgd.py --rows 2048 --batch-size 256 --repeats 5 --threads 1
    python scripts/benchmark_dp_sgd.py --workload sent140_lora --rows 1024 --batch-size 64

The CNN that ``model=auto`` picks for Fashion-MNIST (``--workload cnn``), or the LoRA adapters of the
Sent140 transformer (``--workload sent140_lora``: 2 Llama layers, rank 4 on q/v, and the head), trains one
epoch on the same rows, plainly
(``clients/training.py``) and with DP-SGD (``clients/dp_sgd.py``: Poisson batches, per-example
clipping, noise) in every mode. All variants run in one process, interleaved (repeat r runs every
variant once), so machine load hits them alike; the table gives the median seconds per 1,000
examples and the ratio to plain SGD. Each mode is first checked against a per-example clipped
gradient computed by hand (noise 0, every row in the batch, split into physical batches): a mode
that disagrees, or fails, is marked and never recommended.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from clients.dp_sgd import GRAD_SAMPLE_MODES, DPSGDError, train_dp_sgd  # noqa: E402
from clients.training import train  # noqa: E402
from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.task import dataset_for, new_model  # noqa: E402


WORKLOADS = {"cnn": ["dataset=fashion_mnist", "model=cnn"],
             "sent140_lora": ["dataset=sent140", "model=transformer"]}


def manual_clipped_step(model, x, y, max_grad_norm: float, lr: float) -> list[torch.Tensor]:
    """Trainable parameters after one SGD step on the mean of per-example clipped gradients (by hand)."""
    params = trainable(model)
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1]).long()).backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return [p.detach() - lr * t / len(x) for p, t in zip(params, total)]


def trainable(model) -> list[torch.Tensor]:
    """What DP-SGD clips and noises: every parameter of the CNN, the adapters and head of a LoRA model."""
    return [p for p in model.parameters() if p.requires_grad]


def check_mode(rc, mode: str, x: np.ndarray, y: np.ndarray, physical: int, device: str) -> tuple[bool, str]:
    """Does ``mode`` compute the clipped mean gradient (noise 0, q = 1, physical splits)?"""
    model = new_model(rc)
    expected = manual_clipped_step(new_model(rc), x, y, 0.5, 1.0)
    try:
        result = train_dp_sgd(model, x, y, epochs=1, batch_size=len(x), lr=1.0, noise_multiplier=0.0,
                              max_grad_norm=0.5, grad_sample_mode=mode, max_physical_batch_size=physical,
                              sampling_seed=1, noise_seed=2, device=device)
    except DPSGDError as exc:
        return False, str(exc).splitlines()[0][:80]
    err = max(float((p.detach().cpu() - e).abs().max()) for p, e in zip(trainable(result.model), expected))
    return err < 1e-5, f"max |error| {err:.1e}"


def _clock(device: str) -> float:
    """perf_counter after the GPU has finished its queued work (CUDA kernels run asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=WORKLOADS, default="cnn", help="the model and data (see above)")
    ap.add_argument("--rows", type=int, default=2048, help="training rows (one client's share)")
    ap.add_argument("--batch-size", type=int, default=256, help="logical (expected Poisson) batch size")
    ap.add_argument("--physical", type=int, default=256, help="max_physical_batch_size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (clients use 1)")
    ap.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES))
    ap.add_argument("--device", default="cpu", help="cpu | cuda (timings synchronise the GPU)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    rc = compose_config(WORKLOADS[args.workload])
    ds = dataset_for(rc)
    x, y = np.asarray(ds.x_train[: args.rows]), np.asarray(ds.y_train[: args.rows])
    modes = [m for m in args.modes.split(",") if m]
    print(f"{args.workload}: {' '.join(WORKLOADS[args.workload])} ({sum(p.numel() for p in trainable(new_model(rc))):,} "
          "trained parameters), "
          f"{len(x)} rows, batch {args.batch_size} (DP: Poisson, expected), physical {args.physical}, "
          f"{args.threads} thread(s), torch {torch.__version__}, device {_device_name(args.device)}", flush=True)

    status = {}
    for mode in modes:
        status[mode] = check_mode(rc, mode, x[:24], y[:24], physical=7, device=args.device)
        print(f"  check {mode:9s}: {'ok' if status[mode][0] else 'FAILED'} ({status[mode][1]})", flush=True)

    def plain() -> float:
        model = new_model(rc)
        t = _clock(args.device)
        train(model, x, y, epochs=1, batch_size=args.batch_size, lr=0.05, generator=torch.Generator().manual_seed(0),
              device=args.device)
        _clock(args.device)
        return (time.perf_counter() - t) / len(x) * 1000

    def private(mode: str):
        def run() -> float:
            model = new_model(rc)
            t = _clock(args.device)
            r = train_dp_sgd(model, x, y, epochs=1, batch_size=args.batch_size, lr=0.05, noise_multiplier=1.0,
                             max_grad_norm=1.0, grad_sample_mode=mode, max_physical_batch_size=args.physical,
                             sampling_seed=0, noise_seed=0, device=args.device)
            _clock(args.device)
            return (time.perf_counter() - t) / max(r.examples_seen, 1) * 1000
        return run

    variants = {"non-private": plain} | {m: private(m) for m in modes if status[m][0]}
    for run in variants.values():  # warm-up (imports, allocator)
        run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, run in variants.items():
            times[name].append(run())
        print(f"  repeat {r + 1}/{args.repeats} done", flush=True)

    base = statistics.median(times["non-private"])
    print()
    print(f"| variant | correct | s per 1,000 examples (median of {args.repeats}) | x non-private |")
    print("|---|---|---|---|")
    print(f"| non-private SGD | - | {base:.3f} | 1.00 |")
    best = None
    for mode in modes:
        if not status[mode][0]:
            print(f"| DP-SGD {mode} | no ({status[mode][1]}) | - | - |")
            continue
        med = statistics.median(times[mode])
        print(f"| DP-SGD {mode} | yes | {med:.3f} | {med / base:.2f} |")
        if best is None or med < best[1]:
            best = (mode, med)
    if best is not None:
        print(f"\nfastest correct mode: {best[0]} ({best[1] / base:.2f}x non-private)")


if __name__ == "__main__":
    main()
