"""Vocab-parallel softmax statistics of one distribution: entropy, token log-probs, top-k.

Each rank holds columns [r * V_pad / tp, (r + 1) * V_pad / tp) of [s, b, V_pad / tp] logits.
Every function computes its statistics shard-locally (`_kernels`) and makes exactly ONE
collective in forward: an all-gather of a small packed [n, c] per-token tensor (local max, local
sum of exp, local entropy numerator, the logits this rank owns at the requested ids, the local
top-k). The merge then happens in float64 on every rank identically. Backward makes no collective.
The full vocabulary is never gathered.

Every public function takes `chunk_size`: tokens per row chunk of the shard-local kernels (the
config's `loss.chunk_size`; None: sized by `_kernels.row_chunk`). It bounds transient memory and
never changes the result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import (
    check_gathered,
    check_token_ids,
    merge_single,
    prepare_logits,
    stats_buffer,
)
from megatron_eaopd.parallel.groups import all_gather_rows


def softmax_stats_chunk(logits, local_ids, own, k, shard, inv_temp, out) -> None:
    """Fill one row chunk of the packed local statistics (no communication).

    Args:
        logits: [c, w] rows of this rank's shard; local_ids, own: [c, j] ids minus the shard start
            and whether this rank owns them; out: [c, >= 3 + j + 2k] rows of the stats buffer.
    Writes [m_r, Z_r, A_r, x at owned ids (0 elsewhere), local top-k values (-inf padded),
    their global ids (-1 padded)] with x = logits / T.
    """
    width = logits.shape[1]
    j = local_ids.shape[1]
    acc = out.dtype
    out[:, :3] = K.single_stats(logits, shard.valid, inv_temp)
    if j:
        vals = logits.gather(1, local_ids.clamp(0, width - 1)).to(acc) * inv_temp
        out[:, 3 : 3 + j] = torch.where(own, vals, 0.0)
    if k:
        kk = min(k, shard.valid)
        top_v, top_i = torch.topk(logits[:, : shard.valid], kk, dim=-1)
        out[:, 3 + j : 3 + j + k] = float("-inf")
        out[:, 3 + j + k : 3 + j + 2 * k] = -1.0
        out[:, 3 + j : 3 + j + kk] = top_v.to(acc) * inv_temp
        out[:, 3 + j + k : 3 + j + k + kk] = (top_i + shard.start).to(acc)


def merge_softmax_stats(gathered: torch.Tensor, j: int, k: int, acc: torch.dtype):
    """Merge gathered packed statistics [tp, n, 4 + j + 2k] (see `softmax_stats_chunk`) in
    float64: returns (entropy [n], logprobs at the ids [n, j], lse [n], top-k log-probs [n, k],
    top-k global ids [n, k] int64), floats in `acc`."""
    check_gathered(gathered, [0], "vocab-parallel softmax statistics")
    g = gathered.double()
    n = g.shape[1]
    lse, entropy = merge_single(g[..., 0], g[..., 1], g[..., 2])
    logprobs = (g[..., 3 : 3 + j].sum(0) - lse[:, None]).to(acc)
    if k:
        tp = g.shape[0]
        cand_v = g[..., 3 + j : 3 + j + k].permute(1, 0, 2).reshape(n, tp * k)
        cand_i = g[..., 3 + j + k : 3 + j + 2 * k].permute(1, 0, 2).reshape(n, tp * k)
        top_v, pos = torch.topk(cand_v, k, dim=-1)
        topk_lp = (top_v - lse[:, None]).to(acc)
        topk_ids = cand_i.gather(1, pos).long()
    else:
        topk_lp = torch.empty(n, 0, dtype=acc, device=gathered.device)
        topk_ids = torch.empty(n, 0, dtype=torch.long, device=gathered.device)
    return entropy.to(acc), logprobs, lse.to(acc), topk_lp, topk_ids


def softmax_stats_grad_chunk(
    logits, local_ids, own, lse, entropy, g_entropy, g_logprobs, shard, inv_temp, out
) -> None:
    """d/d logits of  g_H * H + sum_j g_j * log p(id_j)  for one row chunk, written into `out`.

    Args: logits [c, w]; local_ids, own [c, j]; lse, entropy, g_entropy [c] and g_logprobs [c, j]
    in the accumulation dtype; out [c, w]. Dense part  -(1/T) p (g_H (log p + H) + sum_j g_j)  by
    the kernel, then the one-hot part at the owned ids, added to the dense part in the accumulation
    dtype before one rounding to the output dtype (matters for bf16 gradients). Repeated ids in a
    row share the summed upstream gradient. No communication.
    """
    width = logits.shape[1]
    g_total = g_logprobs.sum(-1)
    K.single_backward(logits, lse, entropy, g_entropy, g_total, shard.valid, inv_temp, out)
    if not local_ids.shape[1]:
        return
    x = logits.gather(1, local_ids.clamp(0, width - 1)).to(lse.dtype) * inv_temp
    logp = x - lse[:, None]
    p = torch.exp(logp)
    dense = torch.where(p > 0, p * (-g_entropy[:, None] * (logp + entropy[:, None])), 0.0)
    dense = dense - p * g_total[:, None]
    ids = local_ids
    onehot = ((ids[:, :, None] == ids[:, None, :]) * g_logprobs[:, None, :]).sum(-1)
    value = ((dense + onehot) * inv_temp).to(out.dtype)
    rows = torch.arange(ids.shape[0], device=out.device)[:, None].expand_as(ids)
    out.index_put_((rows[own], ids[own]), value[own])


def local_ids_of(ids: torch.Tensor, shard) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ids [n, j] -> (ids minus this shard's start, whether this rank owns them)."""
    local_ids = ids - shard.start
    return local_ids, (local_ids >= 0) & (local_ids < shard.valid)


def upstream_grads(g_entropy, g_logprobs, like: torch.Tensor, j: int):
    """Upstream gradients of (entropy [n], logprobs [n, j]) in `like`'s dtype (zeros for None)."""
    if g_entropy is None:
        g_entropy = torch.zeros_like(like)
    if g_logprobs is None:
        g_logprobs = torch.zeros(like.shape[0], j, dtype=like.dtype, device=like.device)
    return g_entropy.to(like.dtype), g_logprobs.to(like.dtype)


class _SoftmaxStats(torch.autograd.Function):
    """(logits [n, w], ids [n, j]) -> (entropy [n], logprobs at ids [n, j], lse [n],
    topk logprobs [n, k], topk global ids [n, k]).

    Forward: one all-gather of [n, 4 + j + 2k] fp32 (fp64 for fp64 logits). Backward: none; gradient
    d/dx (g_H H + sum_j g_j log p(id_j)) = -g_H p (log p + H) + sum_j g_j (onehot(id_j) - p), / T.
    Saved: the logits shard (not copied), ids, and O(n) per-token values.
    """

    @staticmethod
    def forward(ctx, logits, ids, k, shard, inv_temp, group, chunk_size):
        n, width = logits.shape
        j = ids.shape[1]
        acc = K.acc_dtype(logits.dtype)
        local = stats_buffer(n, 3 + j + 2 * k, width, acc, logits.device)
        local_ids, own = local_ids_of(ids, shard)
        step = ctx.step = K.row_chunk(width, chunk_size)
        for i in range(0, n, step):
            r = slice(i, i + step)
            softmax_stats_chunk(logits[r], local_ids[r], own[r], k, shard, inv_temp, local[r])
        gathered = all_gather_rows(local, group)
        entropy, logprobs, lse, topk_lp, topk_ids = merge_softmax_stats(gathered, j, k, acc)
        ctx.save_for_backward(logits, local_ids, own, lse, entropy)
        ctx.shard, ctx.inv_temp = shard, inv_temp
        ctx.mark_non_differentiable(lse, topk_lp, topk_ids)
        return entropy, logprobs, lse, topk_lp, topk_ids

    @staticmethod
    def backward(ctx, g_entropy, g_logprobs, _g_lse, _g_topk, _g_ids):
        logits, local_ids, own, lse, entropy = ctx.saved_tensors
        g_entropy, g_logprobs = upstream_grads(g_entropy, g_logprobs, lse, local_ids.shape[1])
        out = torch.empty_like(logits)
        step = ctx.step
        for i in range(0, logits.shape[0], step):
            r = slice(i, i + step)
            softmax_stats_grad_chunk(
                logits[r], local_ids[r], own[r], lse[r], entropy[r], g_entropy[r],
                g_logprobs[r], ctx.shard, ctx.inv_temp, out[r],
            )  # fmt: skip
        return out, None, None, None, None, None, None


class TeacherPayload(NamedTuple):
    """The compact per-token teacher output the paper's objective needs (no [V] tensor).

    entropy: [s, b] full-vocabulary entropy (nats); token_logprobs: [s, b] log p_T(y_t);
    topk_logprobs: [s, b, k] sorted descending, normalised over the full vocabulary;
    topk_ids: [s, b, k] global vocabulary ids (int64).
    """

    entropy: torch.Tensor
    token_logprobs: torch.Tensor
    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor


def _run(logits, ids, k, temperature, tp_group, vocab_size, name="logits", chunk_size=None):
    prepared = prepare_logits(logits, name, tp_group, vocab_size, temperature)
    x, lead, shard, group, inv_temp = prepared
    if ids is None:
        ids2d = torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
    else:
        ids2d = check_token_ids(ids, lead, shard.vocab_size, "token_ids")
    if k is not None and (not isinstance(k, int) or not 1 <= k <= shard.vocab_size):
        raise ValueError(f"k={k!r} must be an int in [1, vocab_size={shard.vocab_size}]")
    outs = _SoftmaxStats.apply(x, ids2d, k or 0, shard, inv_temp, group, chunk_size)
    return outs, lead


def vocab_parallel_entropy(
    logits: torch.Tensor, *, temperature: float = 1.0, tp_group=None, vocab_size=None,
    chunk_size=None,
) -> torch.Tensor:  # fmt: skip
    """Full-vocabulary entropy H(softmax(logits / T)) of vocab-parallel logits.

    Args:
        logits: [s, b, V_pad / tp] local shard (fp32/bf16/fp16); columns >= vocab_size are ignored.
    Returns:
        [s, b] fp32 entropy in nats, differentiable: dH/dx = -p (log p + H), x = logits / T.
    Collectives: forward 1 all-gather of [s*b, 4] fp32; backward none.
    """
    (entropy, *_), lead = _run(
        logits, None, None, temperature, tp_group, vocab_size, chunk_size=chunk_size
    )
    return entropy.reshape(lead)


def vocab_parallel_gather_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, tp_group=None,
    vocab_size=None, chunk_size=None,
) -> torch.Tensor:  # fmt: skip
    """log softmax(logits / T) over the full vocabulary, read at global ids.

    Args:
        logits: [s, b, V_pad / tp]; ids: [s, b, j] int global ids in [0, vocab_size).
    Returns:
        [s, b, j] fp32, differentiable: d log p(v) / dx = onehot(v) - p.
    Collectives: forward 1 all-gather of [s*b, 4 + j] fp32; backward none.
    """
    (_, logprobs, *_), lead = _run(
        logits, ids, None, temperature, tp_group, vocab_size, chunk_size=chunk_size
    )
    return logprobs.reshape(lead + (logprobs.shape[-1],))


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, tp_group=None,
    vocab_size=None, chunk_size=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-probs at global ids [s, b, j] and the full-vocabulary entropy [s, b], in ONE collective.

    Both are differentiable (see `vocab_parallel_gather_logprobs` and `vocab_parallel_entropy`).
    Collectives: forward 1 all-gather of [s*b, 4 + j] fp32; backward none.
    """
    (entropy, logprobs, *_), lead = _run(
        logits, ids, None, temperature, tp_group, vocab_size, chunk_size=chunk_size
    )
    return logprobs.reshape(lead + (logprobs.shape[-1],)), entropy.reshape(lead)


def vocab_parallel_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0, tp_group=None,
    vocab_size=None, chunk_size=None,
) -> torch.Tensor:  # fmt: skip
    """log p(token_ids) under softmax(logits / T): [s, b, V_pad / tp], [s, b] -> [s, b] fp32.

    Differentiable (d/dx = onehot - p). This is minus megatron-core's vocab_parallel_cross_entropy.
    Collectives: forward 1 all-gather of [s*b, 5] fp32; backward none.
    """
    if token_ids.dim() != logits.dim() - 1:
        raise ValueError(
            f"token_ids must have shape {list(logits.shape[:-1])}, got {list(token_ids.shape)}"
        )
    (_, logprobs, *_), lead = _run(
        logits, token_ids, None, temperature, tp_group, vocab_size, chunk_size=chunk_size
    )
    return logprobs.reshape(lead)


def vocab_parallel_topk(
    logits: torch.Tensor, k: int, *, temperature: float = 1.0, tp_group=None, vocab_size=None,
    chunk_size=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-k of the full vocabulary from vocab-parallel logits, without gathering the vocabulary.

    Each rank takes its local top-k; the k * tp candidates are gathered with the softmax
    statistics in one all-gather and the global top-k is taken from them.
    Returns:
        (logprobs [s, b, k] fp32 normalised over the full vocabulary, sorted descending;
         global_ids [s, b, k] int64). No gradient.
    Collectives: 1 all-gather of [s*b, 4 + 2k] fp32.
    """
    with torch.no_grad():
        (_, _, _, lp, ids), lead = _run(
            logits, None, k, temperature, tp_group, vocab_size, chunk_size=chunk_size
        )
    return lp.reshape(lead + (k,)), ids.reshape(lead + (k,))


def vocab_parallel_teacher_payload(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int = 16, *, temperature: float = 1.0,
    tp_group=None, vocab_size=None, chunk_size=None,
) -> TeacherPayload:  # fmt: skip
    """The teacher's compact payload from its vocab-parallel logits, in one collective.

    Args:
        logits: [s, b, V_pad / tp] teacher logits; token_ids: [s, b] the sampled tokens y_t.
    Returns:
        TeacherPayload(entropy [s, b], token_logprobs [s, b], topk_logprobs [s, b, k],
        topk_ids [s, b, k]); all detached.
    Collectives: 1 all-gather of [s*b, 5 + 2k] fp32.
    """
    if token_ids.dim() != logits.dim() - 1:
        raise ValueError(
            f"token_ids must have shape {list(logits.shape[:-1])}, got {list(token_ids.shape)}"
        )
    with torch.no_grad():
        (ent, lp, _, top_lp, top_ids), lead = _run(
            logits, token_ids, k, temperature, tp_group, vocab_size, name="teacher_logits",
            chunk_size=chunk_size,
        )  # fmt: skip
    return TeacherPayload(
        ent.reshape(lead), lp.reshape(lead), top_lp.reshape(lead + (k,)),
        top_ids.reshape(lead + (k,)),
    )  # fmt: skip


__all__ = [
    "TeacherPayload",
    "vocab_parallel_entropy",
    "vocab_parallel_gather_logprobs",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_teacher_payload",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_topk",
]
