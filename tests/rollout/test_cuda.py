"""Rollouts on a CUDA device (run on a GPU machine: pytest -m gpu tests/rollout/test_cuda.py).

The CPU tests' workers and checks, run in one NCCL process on the GPU: FastDecoder equals
megatron's forward for every norm layout (fp32 and bf16); rollouts with FastDecoder and
compaction, continuous batching, CUDA-graphed decode steps, megatron's KV cache and full
recompute give the same tokens, and
the kept log-probs and entropies equal a fresh forward; a bf16 model keeps FastDecoder (its
first-step check accepts bf16 rounding) and falls back, with megatron's tokens, when RoPE is
switched off.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.dist import run_distributed
from tests.rollout import test_decode_graphs as dg
from tests.rollout import test_fast_decode as fd
from tests.rollout import test_generate as tg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_fast_decoder_equals_megatron_forward_on_cuda():
    (results,) = run_distributed(fd.layouts_worker, 1, backend="nccl", timeout=300)
    for layout, res in results.items():
        fd.check_layout(layout, res, cpu=False)


def test_bf16_first_step_check_on_cuda():
    (res,) = run_distributed(fd._bf16_check_worker, 1, backend="nccl", timeout=300)
    fd.check_bf16(res)


def test_decode_steps_replayed_as_cuda_graphs_equal_live_steps():
    """One graph per static shape, replayed at every step: logits and cache equal the
    live-shape steps' (through row and length buckets, padding rows included)."""
    (res,) = run_distributed(dg.static_worker, 1, True, backend="nccl", timeout=300)
    dg.check_static(res, captured=True)


def test_rollouts_on_cuda_equal_recompute_and_fresh_forward():
    (results,) = run_distributed(tg._all_params_worker, 1, backend="nccl", timeout=300)
    for res in results:
        tg._check_rollouts([res])


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
)
def test_fast_decoder_equals_megatron_forward_with_transformer_engine():
    """Megatron's TE spec (fused norm + linear, TE norms as modules): FastDecoder reads its
    weights; its logits equal TE's own forward (fp32 elementwise, bf16 at the check's
    tolerance). The CPU tests use stand-ins with TE's attributes; this is the real thing."""
    layouts = ("rms_qk", "rms", "layernorm_qk", "rms_qk_bf16")
    (results,) = run_distributed(fd.layouts_worker, 1, True, layouts, backend="nccl",
                                 timeout=300)  # fmt: skip
    for layout, res in results.items():
        assert res["scale"] > 1.0, (layout, res)
        # fp32: TE's GEMMs may run in TF32 (the first-step check's low-precision case too)
        tol = (5e-2 if layout.endswith("bf16") else 2e-3) * res["scale"]
        assert res["err"] < tol and res["err_rows"] < tol, (layout, res)
