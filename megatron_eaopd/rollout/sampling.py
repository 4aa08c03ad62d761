"""Next-token sampling from full-vocabulary logits: temperature, top-k, top-p, inverse-CDF draws.

Sampling is a pure function of the logits and one uniform number per sequence, drawn from an
explicit ``torch.Generator``. Two decoders that produce the same logits and share a generator seed
(the KV-cache loop and the full-recompute loop, or every rank of a tensor-parallel group) therefore
draw the same tokens; no global RNG state is touched, so rollouts after a resume repeat exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "filter_logits", "gather_vocab_logits", "sample_tokens"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn."""

    temperature: float = 1.0
    """Logits are divided by this before top-k / top-p and sampling (> 0)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass reaches top_p; 1.0 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it."""
    logprob_temperature: float | None = None
    """Temperature of the reported log-probs (the loss's temperature); None: ``temperature``.
    Log-probs are always of the untruncated softmax, as the training forward computes them."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int, tp_group=None) -> torch.Tensor:
    """Full-vocabulary fp32 logits from a vocab-parallel shard, padded columns removed.

    Args:
        logits: [..., V_pad / tp] this rank's shard (megatron's vocab-parallel output layer).
        vocab_size: real vocabulary size; columns >= vocab_size (megatron's padding) are dropped.
        tp_group: tensor-parallel group; None: megatron's current one.
    Returns:
        [..., vocab_size] fp32, identical on every rank of the group.
    Collectives: 1 all-gather over the TP group (none at TP=1).
    """
    import torch.distributed as dist

    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group=tp_group) if dist.is_initialized() else 1
    local = logits.float().contiguous()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local, group=tp_group)
        local = torch.cat(parts, dim=-1)
    if local.shape[-1] < vocab_size:
        raise ValueError(f"logits have {local.shape[-1]} columns, fewer than vocab {vocab_size}")
    return local[..., :vocab_size]


def filter_logits(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf. ``scaled``: [b, V], already / T.

    The most likely token is always kept. Ties at the top-k boundary keep the lower ids (a stable
    sort), so the result is deterministic.
    """
    if top_k <= 0 and top_p >= 1.0:
        return scaled
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k > 0:
        drop[:, top_k:] = True
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop |= mass_before >= top_p
    drop[:, 0] = False
    out = scaled.clone()
    out.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return out


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of full-vocabulary logits.

    Args:
        logits: [b, V] fp32 full-vocabulary logits (padding removed).
        params: temperature / top-k / top-p.
        generator: source of the b uniform numbers (exactly b are drawn per call).
    Returns:
        (tokens [b] int64, logprobs [b] fp32 = log softmax(logits / T_lp)[token] of the untruncated
        distribution, entropy [b] fp32 of that same distribution, in nats).
    No communication; identical inputs and generator states give identical outputs.
    """
    b = logits.shape[0]
    u = torch.rand(b, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
    scaled = logits / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p).double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    cdf = cdf / cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1)
    tokens = torch.minimum(tokens, torch.full_like(tokens, logits.shape[-1] - 1))
    # never return a token outside the kept set (a zero-width CDF step at the boundary)
    kept = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) > 0
    tokens = torch.where(kept, tokens, probs.argmax(-1))
    t_lp = params.logprob_temperature or params.temperature
    logp = torch.log_softmax(logits / t_lp, dim=-1)
    token_logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return tokens, token_logprobs.float(), entropy.float()
