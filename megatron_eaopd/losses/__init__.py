"""Vocab-parallel entropy-aware distillation losses (see docs/losses.md for the math)."""

from megatron_eaopd.losses.kl import (
    entropy_gate,
    vocab_parallel_eopd_loss,
    vocab_parallel_kl_terms,
)
from megatron_eaopd.losses.statistics import (
    TeacherPayload,
    vocab_parallel_entropy,
    vocab_parallel_gather_logprobs,
    vocab_parallel_teacher_payload,
    vocab_parallel_token_logprobs,
    vocab_parallel_topk,
)

__all__ = [
    "TeacherPayload",
    "entropy_gate",
    "vocab_parallel_entropy",
    "vocab_parallel_eopd_loss",
    "vocab_parallel_gather_logprobs",
    "vocab_parallel_kl_terms",
    "vocab_parallel_teacher_payload",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_topk",
]
