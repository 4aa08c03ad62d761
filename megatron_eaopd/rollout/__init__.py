"""Student (and teacher) rollouts: sampling with megatron-core's static KV cache under TP."""

from megatron_eaopd.rollout.generate import RolloutBatch, generate
from megatron_eaopd.rollout.sampling import (
    SamplingParams,
    filter_logits,
    gather_vocab_logits,
    sample_tokens,
)

__all__ = [
    "RolloutBatch",
    "SamplingParams",
    "filter_logits",
    "gather_vocab_logits",
    "generate",
    "sample_tokens",
]
