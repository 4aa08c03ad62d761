"""One-pass fused loss for objectives built from per-token log-probs and the entropy.

`linear_row_loss` computes a per-token loss `L_t = row_fn(rows, logp_t [j], H_t)` of the student's
log-probs at given ids and its full-vocabulary entropy, straight from the hidden states entering
the vocab-parallel output layer, in ONE pass over the logits: each chunk's logits are computed,
reduced to packed statistics, all-gathered (one collective per chunk), merged, and, while the
chunk's logits are still live, its logits gradient for the expected upstream gradient is formed and
multiplied into the hidden-state and weight gradients. Backward then only scales the stored
gradients (or recomputes the chunks for any other upstream gradient). 3 matmuls per chunk for the
student instead of the 4 of `fused.vocab_parallel_linear_logprobs_and_entropy` + loss (forward 1,
backward recompute 1 + 2): the paper's sampled objective (`objectives.linear_sampled_objective`
with `grad_weights`) uses it.

Memory: the gradients made in forward (d weight [V_pad / tp, h] in fp32, d hidden [n, h]) are held
from the forward until the backward, where the two-pass form allocates them. megatron's schedules
run one micro-batch's loss backward before the next loss forward on the last stage, so the peak is
the same there; a caller that keeps several one-pass losses alive before one backward holds one
such pair per loss. Without a gradient to make (grad mode off, or neither `hidden` nor `weight`
requires grad, e.g. an evaluation forward) the function runs the two-pass form's forward only.

Requirement on `row_fn(rows: slice, logprobs [c, j], entropy [c]) -> loss [c]`: row t of the result
depends only on row t of the inputs (a per-token loss; a token mean's denominator belongs in the
caller's reduction, i.e. in `grad_weights`' scalar), and it is differentiable in `logprobs` and
`entropy` (autograd on these small tensors gives d L_t / d logp_t and d L_t / d H_t). Those
per-token derivatives are kept ([n, j] + [n]), so any upstream gradient gets the exact gradient.
"""

from __future__ import annotations

import torch

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import check_token_ids, stats_buffer
from megatron_eaopd.losses.fused import (
    _GradSink,
    _logits,
    add_softmax_chunk_grad,
    forward_grads_for,
    fused_row_chunk,
    needs_grad,
    prepare_linear,
    softmax_grads,
    vocab_parallel_linear_logprobs_and_entropy,
)
from megatron_eaopd.losses.statistics import (
    local_ids_of,
    merge_softmax_stats,
    softmax_stats_chunk,
)
from megatron_eaopd.parallel.groups import all_gather_rows


def _checked(loss, entropy):
    if not isinstance(loss, torch.Tensor) or loss.shape != entropy.shape:
        got = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"row_fn must return a per-token loss of shape {list(entropy.shape)}, "
                         f"got {got}")  # fmt: skip
    return loss


def _row_derivatives(row_fn, rows: slice, logprobs, entropy):
    """(loss [c], d loss / d logprobs [c, j], d loss / d entropy [c]) of a per-token `row_fn`."""
    with torch.enable_grad():
        lp = logprobs.detach().requires_grad_(True)
        ent = entropy.detach().requires_grad_(True)
        loss = _checked(row_fn(rows, lp, ent), ent)
        if loss.requires_grad:
            d_lp, d_ent = torch.autograd.grad(loss.sum(), (lp, ent), allow_unused=True)
        else:
            d_lp = d_ent = None
    d_lp = torch.zeros_like(lp) if d_lp is None else d_lp.to(lp.dtype)
    d_ent = torch.zeros_like(ent) if d_ent is None else d_ent.to(ent.dtype)
    return loss.detach().to(ent.dtype), d_lp, d_ent


class _LinearRowLoss(torch.autograd.Function):
    """(hidden [n, h], weight [w, h], ids [n, j], grad_weights [n]) -> (loss [n], logprobs [n, j],
    entropy [n]); only `loss` is differentiable.

    Per chunk of `step` rows: logits = hidden[chunk] @ weight.T, `softmax_stats_chunk`, ONE
    all-gather of the chunk's [c, 3 + j] statistics (padded as `stats_buffer` pads them), the
    float64 merge, `row_fn` and its per-token derivatives D_lp [c, j], D_H [c]; then (if a gradient
    is needed) the chunk's logits gradient for the upstream gradient `gw`:
        G = (1/T) [-gw D_H p (log p + H) + sum_j gw D_lp,j (onehot(id_j) - p)],
    d hidden[chunk] = G W, d W += G^T hidden[chunk], while the logits are live (no recompute).
    Backward: upstream c * gw (checked exactly): the stored gradients times c; any other upstream
    g: every chunk recomputed with g D_lp, g D_H. Then ONE SUM all-reduce of d hidden over TP
    (reduce_hidden; none at TP 1).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, gw, shard, inv_temp, group, step, reduce_hidden, row_fn):
        n, j, width = hidden.shape[0], ids.shape[1], weight.shape[0]
        acc = K.acc_dtype(hidden.dtype)
        local_ids, own = local_ids_of(ids, shard)
        loss = torch.empty(n, dtype=acc, device=hidden.device)
        entropy, lse, d_ent = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
        logprobs = torch.empty(n, j, dtype=acc, device=hidden.device)
        d_lp = torch.empty_like(logprobs)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sink = _GradSink(hidden, weight, need_h, need_w) if (need_h or need_w) else None
        gw = gw.to(acc)
        for i in range(0, n, step):
            r = slice(i, i + step)
            logits = _logits(hidden[r], weight)
            local = stats_buffer(logits.shape[0], 3 + j, width, acc, hidden.device)
            softmax_stats_chunk(logits, local_ids[r], own[r], 0, shard, inv_temp, local)
            gathered = all_gather_rows(local, group)
            entropy[r], logprobs[r], lse[r], _, _ = merge_softmax_stats(gathered, j, 0, acc)
            loss[r], d_lp[r], d_ent[r] = _row_derivatives(row_fn, r, logprobs[r], entropy[r])
            if sink is not None:
                add_softmax_chunk_grad(sink, r, logits, local_ids[r], own[r], lse[r], entropy[r],
                                       gw[r] * d_ent[r], gw[r, None] * d_lp[r], shard,
                                       inv_temp)  # fmt: skip
            del logits  # free this chunk before the next one is allocated
        ctx.save_for_backward(hidden, weight, local_ids, own, gw, lse, entropy, d_lp, d_ent)
        ctx.cfg = (shard, inv_temp, group, step, reduce_hidden)
        ctx.sink = sink
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        hidden, weight, local_ids, own, gw, lse, entropy, d_lp, d_ent = ctx.saved_tensors
        shard, inv_temp, group, step, reduce_hidden = ctx.cfg
        g = torch.zeros_like(lse) if g_loss is None else g_loss.to(lse.dtype)
        sink = forward_grads_for(ctx, g, gw)
        if sink is None:  # another upstream gradient: recompute every chunk
            sink = softmax_grads(
                hidden, weight, local_ids, own, lse, entropy, g * d_ent, g[:, None] * d_lp,
                shard, inv_temp, step, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            )  # fmt: skip
        g_hidden, g_weight = sink.finish(group, reduce_hidden)
        return g_hidden, g_weight, None, None, None, None, None, None, None, None


def linear_row_loss(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, row_fn, grad_weights, *,
    temperature: float = 1.0, tp_group=None, vocab_size=None, chunk_size=None,
    reduce_hidden_grad: bool = True,
):  # fmt: skip
    """A per-token loss of the student's log-probs at `ids` and its entropy, fused with the output
    layer in one pass (see the module docstring).

    Args:
        hidden [s, b, h] (no TP copy region: see `fused`'s docstring); weight [V_pad / tp, h];
        ids [s, b, j] global ids; row_fn(rows: slice, logprobs [c, j], entropy [c]) -> loss [c],
        rows indexing the flattened [s * b] tokens. row_fn MUST be per-token: row t of its result
        may depend only on row t of its inputs (not checked: a loss that mixes tokens, e.g. one
        that subtracts a batch mean, gets silently wrong values across chunks and wrong
        gradients); grad_weights [s, b]: the upstream gradient the loss will get up to a scalar
        (the loss mask when the caller sums masked per-token losses).
    Returns:
        (loss [s, b] with gradients to hidden and weight, logprobs [s, b, j] and entropy [s, b]
        detached), fp32 (fp64 for fp64 inputs).
    Gradient: d/dx L_t = (1/T) [D_lp,t . (onehot(ids_t) - p_t) - D_H,t p_t (log p_t + H_t)] per
    token (upstream-weighted), d hidden = sum_TP G @ W, d W = G^T @ hidden.
    Collectives: forward 1 all-gather of [chunk, 4 + j] per chunk; backward 1 SUM all-reduce of
    [s*b, h] (none with reduce_hidden_grad=False or at TP 1); none at TP 1.
    """
    h2d, lead, shard, group, inv_temp = prepare_linear(
        hidden, weight, "student", tp_group, vocab_size, temperature
    )
    if ids.dim() != len(lead) + 1:
        raise ValueError(f"ids must have shape {list(lead)} + [j], got {list(ids.shape)}")
    ids2d = check_token_ids(ids, lead, shard.vocab_size, "token_ids")
    if not isinstance(grad_weights, torch.Tensor) or tuple(grad_weights.shape) != lead:
        shape = list(grad_weights.shape) if isinstance(grad_weights, torch.Tensor) else None
        raise ValueError(f"grad_weights must be a tensor of shape {list(lead)}, got {shape}")
    if not needs_grad(hidden, weight):  # nothing to make in forward: statistics only
        logprobs, entropy = vocab_parallel_linear_logprobs_and_entropy(
            hidden, weight, ids, temperature=temperature, tp_group=tp_group,
            vocab_size=vocab_size, chunk_size=chunk_size, reduce_hidden_grad=reduce_hidden_grad,
        )  # fmt: skip
        n, j = ids2d.shape
        loss = _checked(row_fn(slice(0, n), logprobs.reshape(n, j), entropy.reshape(n)),
                        entropy.reshape(n))  # fmt: skip
        return loss.reshape(lead), logprobs.reshape(lead + (ids2d.shape[1],)), entropy.reshape(lead)
    step = fused_row_chunk(weight.shape[0], chunk_size)
    loss, logprobs, entropy = _LinearRowLoss.apply(
        h2d, weight, ids2d, grad_weights.detach().reshape(-1), shard, inv_temp, group, step,
        bool(reduce_hidden_grad), row_fn,
    )  # fmt: skip
    return loss.reshape(lead), logprobs.reshape(lead + (ids2d.shape[1],)), entropy.reshape(lead)


__all__ = ["linear_row_loss"]
