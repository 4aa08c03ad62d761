"""Vocab-parallel entropy-aware distillation losses (see docs/losses.md for the math)."""

from megatron_eaopd.losses.fused import (
    vocab_parallel_linear_eopd_loss,
    vocab_parallel_linear_kl_terms,
    vocab_parallel_linear_logprobs_and_entropy,
    vocab_parallel_linear_teacher_payload,
)
from megatron_eaopd.losses.fused_rows import linear_row_loss
from megatron_eaopd.losses.jsd import vocab_parallel_jsd
from megatron_eaopd.losses.kl import (
    entropy_gate,
    high_entropy,
    vocab_parallel_eopd_loss,
    vocab_parallel_kl_terms,
)
from megatron_eaopd.losses.megatron_loss import (
    DistillMicroBatch,
    check_megatron_config,
    make_loss_func,
    reduce_metrics,
)
from megatron_eaopd.losses.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    exact_objective,
    linear_exact_objective,
    linear_sampled_objective,
    ppo_clip_loss,
    sampled_objective,
    topk_forward_kl,
)
from megatron_eaopd.losses.statistics import (
    TeacherPayload,
    vocab_parallel_entropy,
    vocab_parallel_gather_logprobs,
    vocab_parallel_logprobs_and_entropy,
    vocab_parallel_teacher_payload,
    vocab_parallel_token_logprobs,
    vocab_parallel_topk,
)

__all__ = [
    "OBJECTIVES",
    "DistillMicroBatch",
    "ObjectiveConfig",
    "TeacherPayload",
    "check_megatron_config",
    "entropy_gate",
    "exact_objective",
    "high_entropy",
    "linear_exact_objective",
    "linear_row_loss",
    "linear_sampled_objective",
    "make_loss_func",
    "ppo_clip_loss",
    "reduce_metrics",
    "sampled_objective",
    "topk_forward_kl",
    "vocab_parallel_jsd",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_entropy",
    "vocab_parallel_eopd_loss",
    "vocab_parallel_gather_logprobs",
    "vocab_parallel_kl_terms",
    "vocab_parallel_linear_eopd_loss",
    "vocab_parallel_linear_kl_terms",
    "vocab_parallel_linear_logprobs_and_entropy",
    "vocab_parallel_linear_teacher_payload",
    "vocab_parallel_teacher_payload",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_topk",
]
