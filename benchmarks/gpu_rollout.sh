#!/usr/bin/env bash
# GPU checks for rollouts, run on a CUDA machine from the repo root (docs/benchmarks.md):
#   bash benchmarks/gpu_rollout.sh [OUT_DIR]
# 1) tests/rollout/test_cuda.py: on the GPU, FastDecoder == megatron's forward (fp32 and bf16
#    layouts), rollouts == megatron's KV cache == recompute == CUDA-graphed decode steps,
#    log-probs == a fresh forward;
# 2) bench_rollout_gpu.py at the shape: Qwen3-1.7B-shaped, bf16, batch 128, 512-token
#    prompts, 1024 new tokens: ours, ours with CUDA graphs, ours through megatron's forward,
#    transformers' generate
#    (expected 3-5 minutes on one H100/H200; at most 9 with the timeouts below, so that one
#    device call of 10 minutes holds it).
# megatron-core must import. Where it is not installed and pip cannot reach an index, put its
# wheel in .whl/ first, on a machine that can (the wheel's Python version must match), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
set -uo pipefail
out=${1:-${OUT:-/tmp}}
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || { echo "megatron-core is not installed and .whl/ holds no wheel of it"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, megatron.core as m
print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core',
      m.__version__)"
# full logs under OUT_DIR; the JSON gets each decoder's row as soon as it is measured
timeout 180 python3 -m pytest -q -m gpu tests/rollout/test_cuda.py -p no:cacheprovider \
  >"$out/test_cuda.log" 2>&1
echo "test_cuda.py exit status $?"
tail -25 "$out/test_cuda.log"
timeout 360 python3 benchmarks/bench_rollout_gpu.py --json "$out/bench_rollout_gpu.json" \
  >"$out/bench_rollout_gpu.log" 2>&1
echo "bench_rollout_gpu.py exit status $?"
grep -E "^(  |###|\|)" "$out/bench_rollout_gpu.log"
