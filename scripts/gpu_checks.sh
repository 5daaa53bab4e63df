#!/bin/bash
# fedpriv's GPU checks, on a machine with a CUDA GPU and the project installed (make install with a
# CUDA build of torch: TORCH_SPEC=torch PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128).
#   bash scripts/gpu_checks.sh [OUT_DIR]
# 1. tests/test_gpu.py: device=auto picks the GPU; central DP and DP-SGD (ghost, hooks) train on it
#    and spend exactly the epsilon of the CPU run; non-private training learns what it learns on the CPU.
# 2. scripts/benchmark_dp_sgd.py on cuda, the cross-silo client (6,000 rows, batch 64 and 256):
#    every Opacus grad_sample_mode checked against a hand-computed clipped gradient, then timed.
set -u
OUT_DIR=${1:-gpu-checks}
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py 2>&1 | tee "$OUT_DIR/test_gpu.txt" | tail -3
for b in 64 256; do
  "$PY" scripts/benchmark_dp_sgd.py --device cuda --rows 6000 --batch-size "$b" --physical "$b" --repeats 3 2>&1 \
    | grep -v "repeat " | tee "$OUT_DIR/dpsgd_cuda_b$b.txt"
done
