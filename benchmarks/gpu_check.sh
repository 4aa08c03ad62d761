#!/usr/bin/env bash
# GPU checks for the losses, run on a CUDA machine from the repo root (no install needed):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1) the loss tests on CUDA tensors (eager and torch.compile/Triton kernels, fp32 and bf16);
# 2) the loss benchmark at 8192 tokens x 75968 columns (Qwen3's 151,936 vocabulary over TP 2).
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests/losses/test_cuda.py -p no:cacheprovider 2>&1 | tail -15
python3 benchmarks/bench_losses.py --device cuda --tokens 8192 --columns 75968 --tp 1 \
  --dtypes fp32 bf16 --variants ours naive inherent eager --reps 5 --json "$out/bench_gpu.json"
