"""Exact full-vocabulary KL terms between vocab-parallel student and teacher logits, and EOPD.

One fused pass over both shards gives, per token, KL(student || teacher), KL(teacher || student)
and both entropies; forward makes ONE collective (an all-gather of a packed [n, 9] fp32 tensor),
backward none. Saved for backward: the two input shards (not copied) and O(n) per-token values;
transient memory is one row chunk of `chunk_size` tokens (the config's `loss.chunk_size`; None:
sized by `_kernels.row_chunk`).
"""

from __future__ import annotations

import torch

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import (
    check_gathered,
    check_same_shape,
    prepare_logits,
    stats_buffer,
)
from megatron_eaopd.parallel.groups import all_gather_rows


def merge_pair(g: torch.Tensor):
    """Merge gathered per-rank pair statistics [tp, n, 8] (float64, see `_kernels.pair_stats`).

    Returns float64 [n] tensors (rkl, fkl, h_teacher, h_student, lse_student, lse_teacher).
    With w_r = exp(m_r - M) and the shift correction c_r = (mt_r - Mt) - (ms_r - Ms):
        Z = sum w Z_r,  A = sum w (A_r + (m_r - M) Z_r),
        F = sum wt (F_r + c_r Zt_r),  R = sum ws (R_r + c_r Zs_r),
        KL(t||s) = F / Zt - log Zt + log Zs,  KL(s||t) = -R / Zs - log Zs + log Zt.
    """
    ms, mt, zs, zt, a_s, a_t, f, r = g.unbind(-1)
    big_s, big_t = ms.amax(0), mt.amax(0)
    dms = torch.where(zs > 0, ms - big_s, 0.0)
    dmt = torch.where(zt > 0, mt - big_t, 0.0)
    ws = torch.where(zs > 0, torch.exp(dms), 0.0)
    wt = torch.where(zt > 0, torch.exp(dmt), 0.0)
    zs_g, zt_g = (ws * zs).sum(0), (wt * zt).sum(0)
    log_zs, log_zt = torch.log(zs_g), torch.log(zt_g)
    h_s = log_zs - (ws * (a_s + dms * zs)).sum(0) / zs_g
    h_t = log_zt - (wt * (a_t + dmt * zt)).sum(0) / zt_g
    shift = dmt - dms
    fkl = (wt * (f + shift * zt)).sum(0) / zt_g - log_zt + log_zs
    rkl = -(ws * (r + shift * zs)).sum(0) / zs_g - log_zs + log_zt
    return rkl.clamp_min(0.0), fkl.clamp_min(0.0), h_t, h_s, big_s + log_zs, big_t + log_zt


def pair_statistics(student, teacher, shard, inv_temp, group, what, chunk_size=None):
    """Both softmaxes' statistics from [n, w] shards: one fused pass per row chunk, ONE all-gather,
    the float64 merge. Returns (rkl, fkl, h_teacher, h_student, lse_student, lse_teacher), [n] each
    in the accumulation dtype; `chunk_size` rows per kernel call. Raises ValueError (on every rank)
    for NaN / +inf logits, fully masked tokens or shard widths that differ between ranks."""
    n, width = student.shape
    acc = K.acc_dtype(student.dtype)
    local = stats_buffer(n, 8, width, acc, student.device)
    step = K.row_chunk(width, chunk_size)
    for i in range(0, n, step):
        local[i : i + step, :8] = K.pair_stats(
            student[i : i + step], teacher[i : i + step], shard.valid, inv_temp
        )
    gathered = all_gather_rows(local, group)
    check_gathered(gathered, [0, 1], what)
    return tuple(v.to(acc) for v in merge_pair(gathered[..., :8].double()))


class _PairKL(torch.autograd.Function):
    """(student [n, w], teacher [n, w]) -> (rkl, fkl, h_teacher, h_student), each [n] fp32.

    Forward: 1 all-gather of [n, 9] fp32. Backward: none; the gradient to the student logits is
        (1/T) [ g_R ps (log ps - log pt - RKL) + g_F (ps - pt) - g_H ps (log ps + H_s) ];
    the teacher gets none.
    """

    @staticmethod
    def forward(ctx, student, teacher, shard, inv_temp, group, chunk_size):
        rkl, fkl, h_t, h_s, lse_s, lse_t = pair_statistics(
            student, teacher, shard, inv_temp, group, "vocab-parallel KL", chunk_size
        )
        ctx.step = K.row_chunk(student.shape[1], chunk_size)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, rkl, h_s)
        ctx.shard, ctx.inv_temp = shard, inv_temp
        ctx.mark_non_differentiable(h_t)
        return rkl, fkl, h_t, h_s

    @staticmethod
    def backward(ctx, g_rkl, g_fkl, _g_ht, g_hs):
        student, teacher, lse_s, lse_t, rkl, h_s = ctx.saved_tensors
        n, width = student.shape
        zero = torch.zeros_like(rkl)
        g_rkl = zero if g_rkl is None else g_rkl.to(zero.dtype)
        g_fkl = zero if g_fkl is None else g_fkl.to(zero.dtype)
        g_hs = zero if g_hs is None else g_hs.to(zero.dtype)
        out = torch.empty_like(student)
        step = ctx.step
        for i in range(0, n, step):
            r = slice(i, i + step)
            K.pair_backward(
                student[r], teacher[r], lse_s[r], lse_t[r], g_rkl[r], g_fkl[r], g_hs[r],
                rkl[r], h_s[r], ctx.shard.valid, ctx.inv_temp, out[r],
            )  # fmt: skip
        return out, None, None, None, None, None


def vocab_parallel_kl_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
    tp_group=None, vocab_size=None, chunk_size=None,
) -> dict:  # fmt: skip
    """Exact full-vocabulary KL terms and entropies of vocab-parallel student/teacher logits.

    Args:
        student_logits, teacher_logits: [s, b, V_pad / tp] shards of the same tokens.
    Returns:
        dict of [s, b] fp32 tensors: `rkl` = KL(ps || pt), `fkl` = KL(pt || ps),
        `teacher_entropy`, `student_entropy`. rkl, fkl and student_entropy carry gradients to the
        student logits only (teacher_entropy is non-differentiable).
    Collectives: forward 1 all-gather of [s*b, 9] fp32; backward none.
    """
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    s2d, lead, shard, group, inv_temp = prepare_logits(
        student_logits, "student_logits", tp_group, vocab_size, temperature
    )
    t2d, *_ = prepare_logits(teacher_logits, "teacher_logits", tp_group, vocab_size, temperature)
    rkl, fkl, h_t, h_s = _PairKL.apply(s2d, t2d.detach(), shard, inv_temp, group, chunk_size)
    return {
        "rkl": rkl.reshape(lead),
        "fkl": fkl.reshape(lead),
        "teacher_entropy": h_t.reshape(lead),
        "student_entropy": h_s.reshape(lead),
    }


def high_entropy(entropy: torch.Tensor, threshold: float, strict: bool = False) -> torch.Tensor:
    """Boolean [s, b]: H >= threshold (the paper authors' gate), or H > threshold when `strict`.

    The one comparison behind the hard gate and the high-entropy metrics; the two forms differ
    only on exact ties and at threshold 0 (where >= takes every token).
    """
    return entropy > threshold if strict else entropy >= threshold


def entropy_gate(
    teacher_entropy: torch.Tensor, threshold: float, width: float = 0.0, strict: bool = False
) -> torch.Tensor:
    """The EOPD gate on the teacher's entropy (nats), [s, b] -> [s, b] fp32 (fp64 for an fp64
    entropy, so that fkl_coef * gate keeps float64 precision), no gradient.

    width == 0: the hard gate 1[H >= threshold] (the paper authors' code), or 1[H > threshold]
    with `strict`. width > 0: the soft gate sigmoid((H - threshold) / width) (`strict` unused).
    """
    h = gate_input(teacher_entropy)
    if width > 0:
        return torch.sigmoid((h - threshold) / width)
    return high_entropy(h, threshold, strict).to(h.dtype)


def gate_input(teacher_entropy: torch.Tensor) -> torch.Tensor:
    """The detached entropy the gates read: float64 stays float64, anything else becomes fp32."""
    h = teacher_entropy.detach()
    return h if h.dtype == torch.float64 else h.float()


def vocab_parallel_eopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size=None,
    gate_strict: bool = False,
    chunk_size=None,
):
    """Exact full-vocabulary EOPD per token: L_t = RKL_t + fkl_coef * 1[H_T,t >= tau] * FKL_t
    (1[H_T,t > tau] with `gate_strict`).

    RKL = KL(student || teacher), FKL = KL(teacher || student), both over the whole vocabulary,
    H_T the teacher's full-vocabulary entropy, all at temperature T.

    Args:
        student_logits, teacher_logits: [s, b, V_pad / tp] local shards (fp32 or bf16).
    Returns:
        (per_token_loss [s, b] fp32 with gradient to the student logits only,
         metrics: dict of detached [s, b] tensors `teacher_entropy`, `student_entropy`, `rkl`,
         `fkl`, `gate`).
    Gradient: (1/T) [ps (log ps - log pt - RKL) + fkl_coef * gate * (ps - pt)].
    Collectives: forward 1 all-gather of [s*b, 9] fp32; backward none. A column -inf in the
    teacher only makes RKL +inf (in the student only, FKL): the loss is inf, the gradient NaN.
    """
    terms = vocab_parallel_kl_terms(
        student_logits, teacher_logits, temperature=temperature, tp_group=tp_group,
        vocab_size=vocab_size, chunk_size=chunk_size,
    )  # fmt: skip
    gate = entropy_gate(terms["teacher_entropy"], entropy_threshold, strict=gate_strict)
    loss = terms["rkl"] + (fkl_coef * gate) * terms["fkl"]
    metrics = {name: value.detach() for name, value in terms.items()}
    metrics["gate"] = gate
    return loss, metrics
