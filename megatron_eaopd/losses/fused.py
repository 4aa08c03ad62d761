"""Vocab-parallel losses fused with the output layer: hidden states in, no [n, V/tp] logits kept.

Every function here takes the hidden states entering megatron's vocab-parallel output layer
(`ColumnParallelLinear`, `gather_output=False`, no bias) and that layer's weight shard
`[V_pad / tp, h]`, instead of the logits `hidden @ weight.T`. Tokens are processed `chunk` rows at a
time: a chunk's logits `[chunk, V_pad / tp]` are computed, reduced to the same packed per-token
statistics as the unfused functions (`kl.py`, `statistics.py`), and freed; backward recomputes
each chunk's logits from the saved hidden states and weights, forms the chunk's logits gradient
with the same kernels, and multiplies it into the hidden-state and weight gradients. Only the
inputs and O(n) per-token values are saved; transient memory is a few `[chunk, V_pad / tp]`
buffers (student logits, teacher logits, their gradient) plus the `[V_pad / tp, h]` weight
gradient (fp32 for bf16 weights), whatever the number of tokens.

Chunk size: `chunk_size` tokens (the config's `loss.fused_chunk_size`) when given, else about
`EAOPD_FUSED_CHUNK_ELEMS` (default 2**24) logit values per chunk: 512 tokens at 32,768 columns,
64 MiB per fp32 chunk. Unlike the unfused kernels (whose compiled default is 2**28 values per
chunk, since they only read logits that already exist), the matmul here materialises each chunk,
so the default stays small whether or not the kernels are compiled.

Collectives, independent of the number of chunks (none is made per chunk):
  forward  1 all-gather of the packed per-token statistics, as the unfused functions;
  backward 1 SUM all-reduce of the hidden-state gradient [n, h] over the TP group
           (`reduce_hidden_grad=True`, the default), none otherwise or at TP 1.
The all-reduce is megatron's convention for a vocab-parallel output layer: `ColumnParallelLinear`
passes its input through `copy_to_tensor_model_parallel_region` (identity forward, all-reduce
backward), so every rank's hidden states receive the gradient of the full-vocabulary loss. Here it
is inside: pass hidden states that did NOT go through that region. With `reduce_hidden_grad=False`
each rank gets only its shard's contribution and the caller must all-reduce it (e.g. by feeding
`copy_to_tensor_model_parallel_region(hidden)`). Under sequence parallelism pass the hidden
states gathered over the sequence ([s, b, h]; `output_layer.hidden_states_output` does). The
trainer uses these functions with `loss.fused_output` (`trainer.update.distill_forward_step`,
`models.teacher.FrozenTeacher.score`). The weight gradient is this rank's shard's, with no
collective, as for the output layer. Teacher hidden states and weights get no gradient.
"""

from __future__ import annotations

import os

import torch

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import (
    _FLOAT_DTYPES,
    check_gathered,
    check_temperature,
    check_token_ids,
    stats_buffer,
)
from megatron_eaopd.losses.kl import entropy_gate, merge_pair
from megatron_eaopd.losses.statistics import (
    TeacherPayload,
    local_ids_of,
    merge_softmax_stats,
    softmax_stats_chunk,
    softmax_stats_grad_chunk,
    upstream_grads,
)
from megatron_eaopd.parallel.groups import (
    all_gather_rows,
    all_reduce_sum,
    resolve_tp_group,
    tp_rank_and_size,
)
from megatron_eaopd.parallel.vocab import vocab_shard

FUSED_CHUNK_ELEMS = 1 << 24


def fused_row_chunk(width: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk of the fused functions: `chunk_size` when given (validated as in
    `_kernels.row_chunk`), else env EAOPD_FUSED_CHUNK_ELEMS (default 2**24) values / width."""
    if chunk_size is not None:
        return K.row_chunk(width, chunk_size)
    elems = int(os.environ.get("EAOPD_FUSED_CHUNK_ELEMS", str(FUSED_CHUNK_ELEMS)))
    return max(1, elems // max(1, width))


# --------------------------------------------------------------------------- inputs


def prepare_linear(hidden, weight, name: str, tp_group, vocab_size, temperature):
    """Validate hidden states [..., h] and an output-layer weight shard [V_pad / tp, h].

    Returns (hidden2d [n, h], leading shape, VocabShard, tp_group, 1 / temperature). Raises
    ValueError naming the problem (dtype, dims, a hidden size that differs from the weight's, a
    vocab_size that does not fit the shards, a non-positive temperature).
    """
    for what, t in ((f"{name}_hidden", hidden), (f"{name}_weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{what} must be a float32/bfloat16/float16/float64 tensor, got {kind}"
            )
    if hidden.dim() < 2 or weight.dim() != 2:
        raise ValueError(
            f"{name}_hidden must be [..., h] (>= 2 dims) and {name}_weight [V_pad / tp, h]; got "
            f"{list(hidden.shape)} and {list(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}_hidden has hidden size {hidden.shape[-1]} but {name}_weight "
            f"{list(weight.shape)} expects {weight.shape[1]}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{name}_hidden ({hidden.dtype}) and {name}_weight ({weight.dtype}) must share a dtype"
        )
    check_temperature(temperature)
    group = resolve_tp_group(tp_group)
    rank, size = tp_rank_and_size(group)
    shard = vocab_shard(weight.shape[0], rank, size, vocab_size)
    lead = tuple(hidden.shape[:-1])
    return hidden.reshape(-1, hidden.shape[-1]), lead, shard, group, 1.0 / float(temperature)


def _prepare_pair(hs, ws, ht, wt, tp_group, vocab_size, temperature):
    """prepare_linear for both models, and the check that they cover the same tokens and shard.
    Returns (hs2d, lead, shard, group, inv_temp, ht2d)."""
    hs2d, lead, shard, group, inv_temp = prepare_linear(
        hs, ws, "student", tp_group, vocab_size, temperature
    )
    ht2d, lead_t, *_ = prepare_linear(ht, wt, "teacher", tp_group, vocab_size, temperature)
    if lead_t != lead or wt.shape[0] != ws.shape[0]:
        raise ValueError(
            f"teacher_hidden {list(ht.shape)} / teacher_weight {list(wt.shape)} must cover the "
            f"same tokens and vocabulary shard as student_hidden {list(hs.shape)} / "
            f"student_weight {list(ws.shape)}"
        )
    return hs2d, lead, shard, group, inv_temp, ht2d


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One chunk of the output layer: [c, h] @ [w, h]^T -> [c, w] in the inputs' dtype."""
    return hidden @ weight.t()


class _GradSink:
    """Hidden-state and weight gradients accumulated chunk by chunk.

    The weight gradient sums over chunks: in place for fp32/fp64 weights, in an fp32 buffer for
    bf16/fp16 weights (one rounding at the end). The hidden-state gradient is written per chunk.
    """

    def __init__(self, hidden, weight, need_hidden: bool, need_weight: bool):
        self.hidden, self.weight = hidden, weight
        self.g_hidden = torch.empty_like(hidden) if need_hidden else None
        acc = K.acc_dtype(weight.dtype)
        self.g_weight = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        )

    def add(self, rows: slice, g_logits: torch.Tensor) -> None:
        if self.g_hidden is not None:
            torch.matmul(g_logits, self.weight, out=self.g_hidden[rows])
        if self.g_weight is not None:
            if g_logits.dtype == self.g_weight.dtype:
                self.g_weight.addmm_(g_logits.t(), self.hidden[rows])
            else:
                self.g_weight += (g_logits.t() @ self.hidden[rows]).to(self.g_weight.dtype)

    def finish(self, group, reduce_hidden: bool):
        if self.g_hidden is not None and reduce_hidden:
            all_reduce_sum(self.g_hidden, group)
        g_w = self.g_weight
        if g_w is not None and g_w.dtype != self.weight.dtype:
            g_w = g_w.to(self.weight.dtype)
        return self.g_hidden, g_w


def forward_grads_for(ctx, g: torch.Tensor, gw: torch.Tensor):
    """The one-pass forms' gradients made in forward (`ctx.sink`, taken off ctx) for the upstream
    gradient `g`: scaled by c when g == c * gw exactly (`_scale_of`), else None, the buffers then
    freed before the caller recomputes the chunks."""
    sink, ctx.sink = ctx.sink, None
    scale = None if sink is None else _scale_of(g, gw)
    if scale is None:
        return None
    for grad in (sink.g_hidden, sink.g_weight):
        if grad is not None:
            grad.mul_(scale)
    return sink


def add_softmax_chunk_grad(sink, rows: slice, logits, local_ids, own, lse, entropy, g_entropy,
                           g_logprobs, shard, inv_temp) -> None:  # fmt: skip
    """One chunk's logits gradient of g_H H + sum_j g_j log p(id_j) (`softmax_stats_grad_chunk`;
    per-token tensors already sliced to the chunk) multiplied into `sink`'s d hidden and d W."""
    g_logits = torch.empty_like(logits)
    softmax_stats_grad_chunk(
        logits, local_ids, own, lse, entropy, g_entropy, g_logprobs, shard, inv_temp, g_logits
    )
    sink.add(rows, g_logits)


def softmax_grads(hidden, weight, local_ids, own, lse, entropy, g_entropy, g_logprobs, shard,
                  inv_temp, step, need_hidden: bool, need_weight: bool) -> _GradSink:  # fmt: skip
    """Every chunk's logits recomputed and its `add_softmax_chunk_grad`: the gradients to hidden
    [n, h] and weight [w, h] of sum_t (g_H,t H_t + sum_j g_t,j log p_t(id_j)). No communication."""
    sink = _GradSink(hidden, weight, need_hidden, need_weight)
    for i in range(0, hidden.shape[0], step):
        r = slice(i, i + step)
        logits = _logits(hidden[r], weight)
        add_softmax_chunk_grad(sink, r, logits, local_ids[r], own[r], lse[r], entropy[r],
                               g_entropy[r], g_logprobs[r], shard, inv_temp)  # fmt: skip
        del logits  # free this chunk before the next one is allocated
    return sink


# --------------------------------------------------------------------------- student x teacher


class _LinearPairKL(torch.autograd.Function):
    """(hs [n, h], ws [w, h], ht [n, h_t], wt [w, h_t]) -> (rkl, fkl, h_teacher, h_student) [n].

    Forward per chunk: logits of both models, `_kernels.pair_stats`; then ONE all-gather of [n, 9].
    Backward per chunk: both logits recomputed, `_kernels.pair_backward` gives
        G = (1/T) [g_R ps (log ps - log pt - RKL) + g_F (ps - pt) - g_H ps (log ps + H_s)],
    then d hs = G ws, d ws += G^T hs; after the chunks ONE all-reduce of d hs (reduce_hidden).
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, shard, inv_temp, group, step, reduce_hidden):
        n = hs.shape[0]
        acc = K.acc_dtype(hs.dtype)
        local = stats_buffer(n, 8, ws.shape[0], acc, hs.device)
        for i in range(0, n, step):
            r = slice(i, i + step)
            local[r, :8] = K.pair_stats(
                _logits(hs[r], ws), _logits(ht[r], wt), shard.valid, inv_temp
            )
        gathered = all_gather_rows(local, group)
        check_gathered(gathered, [0, 1], "fused vocab-parallel KL")
        rkl, fkl, h_t, h_s, lse_s, lse_t = (
            v.to(acc) for v in merge_pair(gathered[..., :8].double())
        )
        ctx.save_for_backward(hs, ws, ht, wt, lse_s, lse_t, rkl, h_s)
        ctx.cfg = (shard, inv_temp, group, step, reduce_hidden)
        ctx.mark_non_differentiable(h_t)
        return rkl, fkl, h_t, h_s

    @staticmethod
    def backward(ctx, g_rkl, g_fkl, _g_ht, g_hs):
        hs, ws, ht, wt, lse_s, lse_t, rkl, h_s = ctx.saved_tensors
        shard, inv_temp, group, step, reduce_hidden = ctx.cfg
        zero = torch.zeros_like(rkl)
        g_rkl, g_fkl, g_hs = (zero if g is None else g.to(zero.dtype) for g in (g_rkl, g_fkl, g_hs))
        sink = _GradSink(hs, ws, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        for i in range(0, hs.shape[0], step):
            r = slice(i, i + step)
            logits_s = _logits(hs[r], ws)
            g_logits = torch.empty_like(logits_s)
            K.pair_backward(
                logits_s, _logits(ht[r], wt), lse_s[r], lse_t[r], g_rkl[r], g_fkl[r], g_hs[r],
                rkl[r], h_s[r], shard.valid, inv_temp, g_logits,
            )  # fmt: skip
            sink.add(r, g_logits)
            del logits_s, g_logits  # free this chunk before the next one is allocated
        g_hidden, g_weight = sink.finish(group, reduce_hidden)
        return g_hidden, g_weight, None, None, None, None, None, None, None


def vocab_parallel_linear_kl_terms(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, *, temperature: float = 1.0, tp_group=None, vocab_size=None,
    chunk_size=None, reduce_hidden_grad: bool = True,
) -> dict:  # fmt: skip
    """`vocab_parallel_kl_terms` of the logits `student_hidden @ student_weight.T` and
    `teacher_hidden @ teacher_weight.T`, without materialising them.

    Args:
        student_hidden: [s, b, h]; student_weight: [V_pad / tp, h] (output-layer shard);
        teacher_hidden: [s, b, h_t]; teacher_weight: [V_pad / tp, h_t] (same vocabulary shard).
    Returns:
        dict of [s, b] fp32 (fp64 for fp64 inputs): `rkl`, `fkl`, `student_entropy` (gradients to
        student_hidden and student_weight), `teacher_entropy` (none).
    Collectives: per chunk none; forward 1 all-gather of [s*b, 9]; backward 1 SUM all-reduce of
    the [s*b, h] hidden-state gradient (see the module docstring; none if reduce_hidden_grad=False).
    """
    hs, lead, shard, group, inv_temp, ht = _prepare_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, tp_group, vocab_size,
        temperature,
    )  # fmt: skip
    step = fused_row_chunk(student_weight.shape[0], chunk_size)
    rkl, fkl, h_t, h_s = _LinearPairKL.apply(
        hs, student_weight, ht.detach(), teacher_weight.detach(), shard, inv_temp, group, step,
        bool(reduce_hidden_grad),
    )  # fmt: skip
    return {
        "rkl": rkl.reshape(lead),
        "fkl": fkl.reshape(lead),
        "teacher_entropy": h_t.reshape(lead),
        "student_entropy": h_s.reshape(lead),
    }


class _LinearPairLoss(torch.autograd.Function):
    """One pass: (hs, ws, ht, wt, grad_weights [n]) -> (loss, rkl, fkl, h_teacher, h_student,
    gate), each [n], with loss = w_R(H_T) RKL + w_F(H_T) FKL (`weights_fn`).

    Per chunk: both logits, `pair_stats`, ONE all-gather of the chunk's [c, 9] statistics, the
    merge, the weights, and (when a gradient is needed) the logits gradient for the upstream
    gradient `grad_weights` (G = (1/T) [w_R gw ps (log ps - log pt - RKL) + w_F gw (ps - pt)]),
    multiplied into d hidden and d weight while the chunk's logits are still live: no recompute.
    Backward: if the upstream gradient is c * grad_weights for a scalar c (checked exactly, O(n)),
    the precomputed gradients times c; otherwise the chunks are recomputed as in `_LinearPairKL`.
    Then ONE all-reduce of d hidden (reduce_hidden).
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, gw, shard, inv_temp, group, step, reduce_hidden, weights_fn):
        n, width = hs.shape[0], ws.shape[0]
        acc = K.acc_dtype(hs.dtype)
        per = torch.empty(
            9, n, dtype=acc, device=hs.device
        )  # rkl fkl h_t h_s lse_s lse_t w_r w_f g
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        sink = _GradSink(hs, ws, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) if need else None
        gw = gw.to(acc)
        for i in range(0, n, step):
            r = slice(i, i + step)
            logits_s, logits_t = _logits(hs[r], ws), _logits(ht[r], wt)
            local = stats_buffer(logits_s.shape[0], 8, width, acc, hs.device)
            local[:, :8] = K.pair_stats(logits_s, logits_t, shard.valid, inv_temp)
            gathered = all_gather_rows(local, group)
            check_gathered(gathered, [0, 1], "fused vocab-parallel KL")
            for row, v in enumerate(merge_pair(gathered[..., :8].double())):
                per[row, r] = v
            w_r, w_f, gate = weights_fn(per[2, r])
            per[6, r], per[7, r], per[8, r] = w_r, w_f, gate
            if sink is not None:
                g_logits = torch.empty_like(logits_s)
                K.pair_backward(
                    logits_s, logits_t, per[4, r], per[5, r], per[6, r] * gw[r],
                    per[7, r] * gw[r], torch.zeros_like(gw[r]), per[0, r], per[3, r],
                    shard.valid, inv_temp, g_logits,
                )  # fmt: skip
                sink.add(r, g_logits)
                del g_logits
            del logits_s, logits_t  # free this chunk before the next one is allocated
        rkl, fkl, h_t, h_s, lse_s, lse_t, w_r, w_f, gate = per.unbind(0)
        loss = w_r * rkl + w_f * fkl
        ctx.save_for_backward(hs, ws, ht, wt, gw, lse_s, lse_t, rkl, h_s, w_r, w_f)
        ctx.cfg = (shard, inv_temp, group, step, reduce_hidden)
        ctx.sink = sink
        ctx.mark_non_differentiable(rkl, fkl, h_t, h_s, gate)
        return loss, rkl, fkl, h_t, h_s, gate

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        hs, ws, ht, wt, gw, lse_s, lse_t, rkl, h_s, w_r, w_f = ctx.saved_tensors
        shard, inv_temp, group, step, reduce_hidden = ctx.cfg
        g = torch.zeros_like(rkl) if g_loss is None else g_loss.to(rkl.dtype)
        sink = forward_grads_for(ctx, g, gw)
        if sink is None:  # another upstream gradient: recompute every chunk
            sink = _GradSink(hs, ws, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            zero = torch.zeros_like(g)
            for i in range(0, hs.shape[0], step):
                r = slice(i, i + step)
                logits_s = _logits(hs[r], ws)
                g_logits = torch.empty_like(logits_s)
                K.pair_backward(
                    logits_s, _logits(ht[r], wt), lse_s[r], lse_t[r], g[r] * w_r[r],
                    g[r] * w_f[r], zero[r], rkl[r], h_s[r], shard.valid, inv_temp, g_logits,
                )  # fmt: skip
                sink.add(r, g_logits)
                del logits_s, g_logits  # free this chunk before the next one is allocated
        g_hidden, g_weight = sink.finish(group, reduce_hidden)
        return g_hidden, g_weight, None, None, None, None, None, None, None, None, None


def needs_grad(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd will want gradients of these student inputs (grad mode on and one of them
    requires grad): the one-pass forms make their gradients in forward only then."""
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _scale_of(g: torch.Tensor, gw: torch.Tensor):
    """The scalar c with g == c * gw exactly (a Python float), or None if there is none."""
    nonzero = (gw != 0).nonzero()
    if nonzero.numel() == 0:
        return 0.0 if bool((g == 0).all()) else None
    i = int(nonzero[0, 0])
    c = float(g[i] / gw[i])
    return c if torch.equal(g, gw * c) else None


def linear_pair_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, weights_fn, grad_weights, *,
    temperature=1.0, tp_group=None, vocab_size=None, chunk_size=None, reduce_hidden_grad=True,
):  # fmt: skip
    """Per-token w_R(H_T) RKL + w_F(H_T) FKL from hidden states, `weights_fn(h_teacher [c]) ->
    (w_R, w_F, gate)` (e.g. `ObjectiveConfig.weights`). Returns (loss [s, b], metrics dict of
    detached [s, b] `rkl`, `fkl`, `teacher_entropy`, `student_entropy`, `gate`).

    grad_weights None: two passes (`_LinearPairKL`: statistics, 1 all-gather; backward recomputes
    the logits). grad_weights [s, b] (the upstream gradient expected for the loss up to a scalar,
    e.g. the loss mask): one pass (`_LinearPairLoss`: 1 all-gather per chunk, the gradients made
    in forward), no recompute when the upstream gradient is c * grad_weights. Without a gradient
    to make (grad mode off, or neither student input requires grad: e.g. an evaluation forward)
    the forward-only statistics of the two-pass form, whatever grad_weights.
    """
    if grad_weights is None or not needs_grad(student_hidden, student_weight):
        terms = vocab_parallel_linear_kl_terms(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
            chunk_size=chunk_size, reduce_hidden_grad=reduce_hidden_grad,
        )  # fmt: skip
        w_r, w_f, gate = weights_fn(terms["teacher_entropy"])
        metrics = {name: value.detach() for name, value in terms.items()}
        metrics["gate"] = gate
        return w_r * terms["rkl"] + w_f * terms["fkl"], metrics
    hs, lead, shard, group, inv_temp, ht = _prepare_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, tp_group, vocab_size,
        temperature,
    )  # fmt: skip
    if not isinstance(grad_weights, torch.Tensor) or tuple(grad_weights.shape) != lead:
        shape = list(grad_weights.shape) if isinstance(grad_weights, torch.Tensor) else None
        raise ValueError(f"grad_weights must be a tensor of shape {list(lead)}, got {shape}")
    step = fused_row_chunk(student_weight.shape[0], chunk_size)
    loss, rkl, fkl, h_t, h_s, gate = _LinearPairLoss.apply(
        hs, student_weight, ht.detach(), teacher_weight.detach(),
        grad_weights.detach().reshape(-1), shard, inv_temp, group, step,
        bool(reduce_hidden_grad), weights_fn,
    )  # fmt: skip
    metrics = {"rkl": rkl, "fkl": fkl, "teacher_entropy": h_t, "student_entropy": h_s}
    metrics["gate"] = gate
    return loss.reshape(lead), {k: v.reshape(lead) for k, v in metrics.items()}


def vocab_parallel_linear_eopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size=None,
    gate_strict: bool = False,
    chunk_size=None,
    reduce_hidden_grad: bool = True,
    grad_weights: torch.Tensor | None = None,
):
    """`vocab_parallel_eopd_loss(student_hidden @ student_weight.T, teacher_hidden @
    teacher_weight.T, ...)` fused with the output layer: L_t = RKL_t + fkl_coef * 1[H_T,t >= tau]
    * FKL_t (1[H_T,t > tau] with `gate_strict`), full vocabulary, no logits materialised.

    Args:
        student_hidden [s, b, h], student_weight [V_pad / tp, h], teacher_hidden [s, b, h_t],
        teacher_weight [V_pad / tp, h_t]; `chunk_size` tokens per chunk (None: about 2**24 logit
        values); `reduce_hidden_grad`: all-reduce the hidden-state gradient over TP inside;
        `grad_weights` [s, b] (optional): the upstream gradient the loss will get, up to a scalar
        (the loss mask when the caller sums masked per-token losses): the gradients are then made
        in the forward pass, one pass over the logits (4 matmuls per chunk instead of 6); any
        other upstream gradient still gives the exact gradient, by recomputing the chunks.
    Returns:
        (per_token_loss [s, b] with gradients to student_hidden and student_weight, metrics dict
        of detached [s, b] tensors `teacher_entropy`, `student_entropy`, `rkl`, `fkl`, `gate`).
    Gradient: with G = (1/T) [ps (log ps - log pt - RKL) + fkl_coef gate (ps - pt)] per token
    (upstream-weighted), d hidden = sum_TP G @ W, d W = G^T @ hidden.
    Collectives: grad_weights None: per chunk none; forward 1 all-gather of [s*b, 9]. With
    grad_weights: forward 1 all-gather of [chunk, 9] per chunk. Backward: 1 SUM all-reduce of
    [s*b, h] (none if reduce_hidden_grad=False or at TP 1).
    """

    def weights_fn(h_teacher):
        gate = entropy_gate(h_teacher, entropy_threshold, strict=gate_strict).to(h_teacher.dtype)
        return torch.ones_like(gate), fkl_coef * gate, gate

    return linear_pair_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, weights_fn, grad_weights,
        temperature=temperature, tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size,
        reduce_hidden_grad=reduce_hidden_grad,
    )  # fmt: skip


# --------------------------------------------------------------------------- one distribution


def _softmax_stats_forward(hidden, weight, ids, k, shard, inv_temp, group, step):
    """Chunked local statistics of softmax(hidden @ weight.T / T) + ONE all-gather + merge."""
    n, j = hidden.shape[0], ids.shape[1]
    acc = K.acc_dtype(hidden.dtype)
    local = stats_buffer(n, 3 + j + 2 * k, weight.shape[0], acc, hidden.device)
    local_ids, own = local_ids_of(ids, shard)
    for i in range(0, n, step):
        r = slice(i, i + step)
        logits = _logits(hidden[r], weight)
        softmax_stats_chunk(logits, local_ids[r], own[r], k, shard, inv_temp, local[r])
        del logits
    gathered = all_gather_rows(local, group)
    return merge_softmax_stats(gathered, j, k, acc), local_ids, own


class _LinearSoftmaxStats(torch.autograd.Function):
    """(hidden [n, h], weight [w, h], ids [n, j]) -> (entropy [n], logprobs at ids [n, j]).

    Forward per chunk: logits, `statistics.softmax_stats_chunk`; then ONE all-gather of
    [n, 4 + j]. Backward per chunk: logits recomputed, G = d/dlogits of
    g_H H + sum_j g_j log p(id_j) = (1/T) [-g_H p (log p + H) + sum_j g_j (onehot(id_j) - p)],
    d hidden = G W, d W += G^T hidden; after the chunks ONE all-reduce of d hidden (reduce_hidden).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, shard, inv_temp, group, step, reduce_hidden):
        (entropy, logprobs, lse, _, _), local_ids, own = _softmax_stats_forward(
            hidden, weight, ids, 0, shard, inv_temp, group, step
        )
        ctx.save_for_backward(hidden, weight, local_ids, own, lse, entropy)
        ctx.cfg = (shard, inv_temp, group, step, reduce_hidden)
        return entropy, logprobs

    @staticmethod
    def backward(ctx, g_entropy, g_logprobs):
        hidden, weight, local_ids, own, lse, entropy = ctx.saved_tensors
        shard, inv_temp, group, step, reduce_hidden = ctx.cfg
        g_entropy, g_logprobs = upstream_grads(g_entropy, g_logprobs, lse, local_ids.shape[1])
        sink = softmax_grads(
            hidden, weight, local_ids, own, lse, entropy, g_entropy, g_logprobs, shard, inv_temp,
            step, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        g_hidden, g_weight = sink.finish(group, reduce_hidden)
        return g_hidden, g_weight, None, None, None, None, None, None


def vocab_parallel_linear_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
    tp_group=None, vocab_size=None, chunk_size=None, reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`vocab_parallel_logprobs_and_entropy(hidden @ weight.T, ids, ...)` fused with the output
    layer: log-probs at global ids and the full-vocabulary entropy, no logits materialised.

    Args:
        hidden [s, b, h]; weight [V_pad / tp, h]; ids [s, b, j] (or [s, b]) global ids.
    Returns:
        (logprobs [s, b, j] (or [s, b]), entropy [s, b]), fp32 (fp64 for fp64 inputs), both with
        gradients to hidden and weight: d log p(v)/dx = onehot(v) - p, dH/dx = -p (log p + H).
    Collectives: per chunk none; forward 1 all-gather of [s*b, 4 + j]; backward 1 SUM all-reduce
    of [s*b, h] (none if reduce_hidden_grad=False or at TP 1).
    """
    h2d, lead, shard, group, inv_temp = prepare_linear(
        hidden, weight, "student", tp_group, vocab_size, temperature
    )
    ids2d = check_token_ids(ids, lead, shard.vocab_size, "token_ids")
    step = fused_row_chunk(weight.shape[0], chunk_size)
    entropy, logprobs = _LinearSoftmaxStats.apply(
        h2d, weight, ids2d, shard, inv_temp, group, step, bool(reduce_hidden_grad)
    )
    shape = lead if ids.dim() == len(lead) else lead + (-1,)
    return logprobs.reshape(shape), entropy.reshape(lead)


def vocab_parallel_linear_teacher_payload(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, k: int = 16, *,
    temperature: float = 1.0, tp_group=None, vocab_size=None, chunk_size=None,
) -> TeacherPayload:  # fmt: skip
    """`vocab_parallel_teacher_payload(hidden @ weight.T, token_ids, k, ...)` fused with the
    teacher's output layer: entropy, sampled-token log-prob, top-k log-probs and global ids.

    Args:
        hidden [s, b, h_t] teacher hidden states; weight [V_pad / tp, h_t]; token_ids [s, b].
    Returns:
        TeacherPayload(entropy [s, b], token_logprobs [s, b], topk_logprobs [s, b, k],
        topk_ids [s, b, k]), all detached. Transient memory: one [chunk, V_pad / tp] logits chunk.
    Collectives: per chunk none; 1 all-gather of [s*b, 5 + 2k]; no backward.
    """
    h2d, lead, shard, group, inv_temp = prepare_linear(
        hidden, weight, "teacher", tp_group, vocab_size, temperature
    )
    if token_ids.dim() != len(lead):
        raise ValueError(f"token_ids must have shape {list(lead)}, got {list(token_ids.shape)}")
    if not isinstance(k, int) or not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k={k!r} must be an int in [1, vocab_size={shard.vocab_size}]")
    ids2d = check_token_ids(token_ids, lead, shard.vocab_size, "token_ids")
    step = fused_row_chunk(weight.shape[0], chunk_size)
    with torch.no_grad():
        (ent, lp, _, top_lp, top_ids), _, _ = _softmax_stats_forward(
            h2d.detach(), weight.detach(), ids2d, k, shard, inv_temp, group, step
        )
    return TeacherPayload(
        ent.reshape(lead), lp.reshape(lead), top_lp.reshape(lead + (k,)),
        top_ids.reshape(lead + (k,)),
    )  # fmt: skip


__all__ = [
    "fused_row_chunk",
    "linear_pair_loss",
    "vocab_parallel_linear_eopd_loss",
    "vocab_parallel_linear_kl_terms",
    "vocab_parallel_linear_logprobs_and_entropy",
    "vocab_parallel_linear_teacher_payload",
]
