"""Exact full-vocabulary generalised Jensen-Shannon divergence (TRL GKD's JSD(beta)).

    M = beta * pt + (1 - beta) * ps
    JSD_beta = beta * KL(pt || M) + (1 - beta) * KL(ps || M)

beta -> 0 approaches forward KL in its gradient direction, beta -> 1 reverse KL; use the `fkl` or
`opd` objectives for the end points. Unlike KL, log M needs the normalised log-probs, so forward
makes TWO collectives: the statistics all-gather, then a SUM all-reduce of [n, 2] partials.
Backward makes none: d JSD / dx = (1 - beta) ps (log ps - log M - KL(ps || M)) / T.
"""

from __future__ import annotations

import math

import torch

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import check_same_shape, prepare_logits
from megatron_eaopd.losses.kl import pair_statistics
from megatron_eaopd.parallel.groups import all_reduce_sum


class _PairJSD(torch.autograd.Function):
    """(student [n, w], teacher [n, w]) -> (jsd, h_teacher, h_student), each [n]."""

    @staticmethod
    def forward(ctx, student, teacher, beta, shard, inv_temp, group, chunk_size):
        n, width = student.shape
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        _, _, h_t, h_s, lse_s, lse_t = pair_statistics(
            student, teacher, shard, inv_temp, group, "vocab-parallel JSD", chunk_size
        )
        step = ctx.step = K.row_chunk(width, chunk_size)
        parts = torch.empty(n, 2, dtype=lse_s.dtype, device=student.device)
        for i in range(0, n, step):
            r = slice(i, i + step)
            parts[r] = K.jsd_partials(
                student[r], teacher[r], lse_s[r], lse_t[r], log_b, log_1mb, shard.valid, inv_temp
            )
        all_reduce_sum(parts, group)
        kl_t, kl_s = parts.clamp_min(0.0).unbind(-1)
        jsd = beta * kl_t + (1.0 - beta) * kl_s
        ctx.save_for_backward(student, teacher, lse_s, lse_t, kl_s)
        ctx.beta, ctx.shard, ctx.inv_temp = beta, shard, inv_temp
        ctx.mark_non_differentiable(h_t, h_s)
        return jsd, h_t, h_s

    @staticmethod
    def backward(ctx, g_jsd, _g_ht, _g_hs):
        student, teacher, lse_s, lse_t, kl_s = ctx.saved_tensors
        n, width = student.shape
        beta = ctx.beta
        coef = (1.0 - beta) * g_jsd.to(lse_s.dtype)
        out = torch.empty_like(student)
        step = ctx.step
        for i in range(0, n, step):
            r = slice(i, i + step)
            K.jsd_backward(
                student[r], teacher[r], lse_s[r], lse_t[r], kl_s[r], coef[r], math.log(beta),
                math.log1p(-beta), ctx.shard.valid, ctx.inv_temp, out[r],
            )  # fmt: skip
        return out, None, None, None, None, None, None


def vocab_parallel_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
    temperature: float = 1.0, tp_group=None, vocab_size=None, chunk_size=None,
) -> dict:  # fmt: skip
    """Generalised JSD(beta) per token over the full vocabulary, vocab-parallel.

    Args:
        student_logits, teacher_logits: [s, b, V_pad / tp]; beta in (0, 1).
    Returns:
        dict of [s, b] tensors: `jsd` (gradient to the student logits), `teacher_entropy`,
        `student_entropy` (no gradient).
    Collectives: forward 1 all-gather of [s*b, 9] + 1 SUM all-reduce of [s*b, 2]; backward none.
    """
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(
            f"jsd beta={beta!r} must be strictly between 0 and 1; use objective 'fkl' for "
            "forward KL or 'opd' for reverse KL"
        )
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    s2d, lead, shard, group, inv_temp = prepare_logits(
        student_logits, "student_logits", tp_group, vocab_size, temperature
    )
    t2d, *_ = prepare_logits(teacher_logits, "teacher_logits", tp_group, vocab_size, temperature)
    jsd, h_t, h_s = _PairJSD.apply(
        s2d, t2d.detach(), float(beta), shard, inv_temp, group, chunk_size
    )
    return {
        "jsd": jsd.reshape(lead),
        "teacher_entropy": h_t.reshape(lead),
        "student_entropy": h_s.reshape(lead),
    }
