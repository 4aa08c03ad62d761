"""The distillation objectives built on the vocab-parallel statistics, selected by config.

Two forms, per response token t:

* `sampled` (the paper): the teacher arrives as a compact `TeacherPayload`.
      L_t = PPO-clip(ratio_t, A_t) + fkl_coef * gate(H_T,t) * FKL_topk,t
  with ratio = p_theta(y) / p_old(y), A = sg(log p_T(y) - log p_old(y)), clip `clip_eps`, and
  FKL_topk = sum_{v in S_k} q~_v (log q~_v - log p_theta(v)) over the teacher's top-k S_k (q~
  renormalised on S_k, p_theta normalised over the full vocabulary). With `tail_bucket`, q is not
  renormalised and the mass outside S_k forms one more bucket on both sides.
* `exact`: the teacher's full logits shard arrives; KL terms over the whole vocabulary.
      L_t = w_R RKL_t + w_F(H_T,t) FKL_t    (or JSD_beta)

Objective names (both forms unless noted): `opd` (reverse KL only), `eopd` (hard gate 1[H_T >= tau]
as in the paper authors' code; 1[H_T > tau] with `gate_strict`), `eopd_soft` (sigmoid((H_T - tau) /
gate_width)), `mix` ((1 - w) RKL + w FKL, no gate), `fkl` (forward KL only), `jsd` (generalised
JSD(beta), exact form only).
Per-token losses are returned unreduced; sum them over valid tokens and divide by the number of
valid tokens in the global batch (`megatron_loss.make_loss_func` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_eaopd.losses._common import check_temperature
from megatron_eaopd.losses.fused import (
    linear_pair_loss,
    vocab_parallel_linear_logprobs_and_entropy,
)
from megatron_eaopd.losses.fused_rows import linear_row_loss
from megatron_eaopd.losses.jsd import vocab_parallel_jsd
from megatron_eaopd.losses.kl import entropy_gate, gate_input, vocab_parallel_kl_terms
from megatron_eaopd.losses.statistics import TeacherPayload, vocab_parallel_logprobs_and_entropy

OBJECTIVES = ("opd", "eopd", "eopd_soft", "mix", "fkl", "jsd")
FORMS = ("sampled", "exact")


@dataclass
class ObjectiveConfig:
    """Which distillation objective to optimise and its hyperparameters."""

    name: str = "eopd"
    """One of OBJECTIVES: opd, eopd, eopd_soft, mix, fkl, jsd."""
    form: str = "sampled"
    """`sampled` (paper: PPO sampled-token reverse KL + top-k forward KL from a teacher payload)
    or `exact` (full-vocabulary KL from the teacher's logits shard)."""
    entropy_threshold: float = 0.8
    """tau: teacher entropy (nats) from which forward KL is added, H >= tau (paper: 0.8)."""
    gate_strict: bool = False
    """Hard gate (and high-entropy metrics) with H > tau instead of H >= tau."""
    fkl_coef: float = 1.0
    """alpha: weight of the gated forward KL (paper: 1.0)."""
    gate_width: float = 0.1
    """Temperature of the soft gate sigmoid((H - tau) / gate_width), objective eopd_soft."""
    mix_weight: float = 0.5
    """w in (1 - w) RKL + w FKL, objective mix."""
    jsd_beta: float = 0.5
    """beta of the generalised JSD, objective jsd (exact form)."""
    clip_eps: float = 0.2
    """PPO clip range of the sampled-token policy gradient (paper: 0.2)."""
    top_k: int = 16
    """Size of the teacher's top-k set for the sampled form's forward KL (paper: 16)."""
    tail_bucket: bool = False
    """Sampled form: add the mass outside the top-k as one more bucket (no renormalisation)."""
    temperature: float = 1.0
    """Logits are divided by this before every softmax (the rollout temperature)."""
    chunk_size: int | None = None
    """Tokens per row chunk of the vocab-parallel kernels (memory, not results); None: sized by
    `_kernels.row_chunk` (about 2**24 / 2**28 logit values per chunk, env EAOPD_CHUNK_ELEMS)."""
    fused_output: bool | None = None
    """Trainer only: compute the loss from the student's final hidden states and output weight
    shard, chunk by chunk (`fused.py`), never the [s, b, V_pad / tp] logits; in the exact form the
    teacher contributes its hidden states and weight instead of its logits. None: on for every
    objective but `jsd` (which has no fused form); `use_fused` resolves it."""
    fused_chunk_size: int | None = None
    """Tokens per chunk of the fused functions (`fused.fused_row_chunk`; memory, not results);
    None: about 2**24 logit values per chunk (env EAOPD_FUSED_CHUNK_ELEMS)."""

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective name {self.name!r} is not one of {OBJECTIVES}")
        if self.form not in FORMS:
            raise ValueError(f"objective form {self.form!r} is not one of {FORMS}")
        if self.name == "jsd" and self.form != "exact":
            raise ValueError("objective 'jsd' needs form='exact' (full teacher logits)")
        if self.clip_eps <= 0 or self.top_k < 1 or self.gate_width <= 0:
            raise ValueError("clip_eps and gate_width must be > 0 and top_k >= 1")
        check_temperature(self.temperature)
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"mix_weight={self.mix_weight} must be in [0, 1]")
        if self.chunk_size is not None and (
            not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be None or an int >= 1")
        if self.fused_chunk_size is not None and (
            not isinstance(self.fused_chunk_size, int) or self.fused_chunk_size < 1
        ):
            raise ValueError(
                f"fused_chunk_size={self.fused_chunk_size!r} must be None or an int >= 1"
            )
        if self.name == "jsd" and self.fused_output:
            raise ValueError("objective 'jsd' has no fused form: set fused_output to False or None")

    @property
    def use_fused(self) -> bool:
        """Whether the trainer fuses the loss with the output layer (`fused_output`, resolved)."""
        return self.name != "jsd" if self.fused_output is None else bool(self.fused_output)

    def weights(self, teacher_entropy: torch.Tensor):
        """Per-token (w_rkl, w_fkl, gate), [s, b] each, no gradient; the gate reads H_T.

        gate is the forward-KL indicator actually applied (hard 0/1, soft in (0, 1), 1 for mix
        and fkl, 0 for opd), so w_fkl = coefficient * gate.
        """
        h = gate_input(teacher_entropy)
        one, zero = torch.ones_like(h), torch.zeros_like(h)
        if self.name == "opd":
            return one, zero, zero
        if self.name in ("eopd", "eopd_soft"):
            width = self.gate_width if self.name == "eopd_soft" else 0.0
            gate = entropy_gate(h, self.entropy_threshold, width, strict=self.gate_strict)
            return one, self.fkl_coef * gate, gate
        if self.name == "mix":
            return (1.0 - self.mix_weight) * one, self.mix_weight * one, one
        if self.name == "fkl":
            return zero, one, one
        raise ValueError(f"objective {self.name!r} has no RKL/FKL weights")


def ppo_clip_loss(logprobs, old_logprobs, advantages, clip_eps):
    """-min(r A, clip(r, 1 - eps, 1 + eps) A) per token, r = exp(logprobs - old_logprobs).

    Returns (loss [s, b], ratio [s, b] detached, clipped [s, b] float 0/1). Gradient flows through
    `logprobs` only; advantages must already be detached.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, ratio.detach(), (clipped < unclipped).float().detach()


def topk_forward_kl(student_topk_logprobs, teacher_topk_logprobs, tail_bucket=False):
    """Forward KL on the teacher's top-k set, [s, b, k] log-probs (both full-vocab normalised).

    Without tail bucket: q~ = softmax(teacher top-k log-probs) (renormalised on the set),
        FKL = sum_v q~_v (log q~_v - log p_theta(v)).
    With tail bucket: q_v = p_T(v) as given, plus the bucket q_tail = 1 - sum_v q_v against
        p_tail = 1 - sum_v p_theta(v). Returns [s, b] with gradient to the student log-probs.
    """
    lp_s = student_topk_logprobs
    lq = teacher_topk_logprobs.detach().to(lp_s.dtype)
    if not tail_bucket:
        lq = torch.log_softmax(lq, dim=-1)
        return (lq.exp() * (lq - lp_s)).sum(-1)
    head = (lq.exp() * (lq - lp_s)).sum(-1)
    tiny = torch.finfo(lp_s.dtype).tiny

    def log_tail(logprobs):  # log(1 - sum exp(logprobs)), floored at log(tiny)
        head_mass = torch.logsumexp(logprobs, -1).clamp_max(0.0)
        return torch.log((-torch.expm1(head_mass)).clamp_min(tiny))

    log_q_tail, log_p_tail = log_tail(lq), log_tail(lp_s)
    q_tail = log_q_tail.exp()
    return head + torch.where(q_tail > tiny, q_tail * (log_q_tail - log_p_tail), 0.0)


def sampled_objective(
    cfg: ObjectiveConfig,
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher: TeacherPayload,
    *,
    tp_group=None,
    vocab_size=None,
):
    """The paper's form. All per-token tensors share the logits' leading shape [s, b].

    Args:
        student_logits: [s, b, V_pad / tp]; token_ids: [s, b] the sampled tokens y_t;
        old_logprobs: [s, b] log p_old(y_t) kept from the rollout, finite at every position
            (give masked ones any finite value); None for teacher-forced data with objective
            ``fkl`` (no PPO term; the PPO metrics are then left out). teacher: TeacherPayload.
    Returns:
        (per_token_loss [s, b], metrics dict of detached [s, b] tensors).
    Collectives: forward 1 all-gather of [s*b, 5 + k] fp32 (the student's log-probs at y_t and
    at the teacher's top-k ids, and its entropy, together); backward none.
    """
    ids = torch.cat([token_ids.unsqueeze(-1), teacher.topk_ids], dim=-1)
    logprobs, student_entropy = vocab_parallel_logprobs_and_entropy(
        student_logits, ids, temperature=cfg.temperature, tp_group=tp_group,
        vocab_size=vocab_size, chunk_size=cfg.chunk_size,
    )  # fmt: skip
    return _sampled_terms(cfg, logprobs, student_entropy, old_logprobs, teacher)


def _sampled_terms(cfg, logprobs, student_entropy, old_logprobs, teacher: TeacherPayload):
    """The paper's per-token loss from the student's log-probs [s, b, 1 + k] at (y, top-k ids)
    and its entropy [s, b]: (per_token_loss, metrics)."""
    lp_y, lp_top = logprobs[..., 0], logprobs[..., 1:]
    w_rkl, w_fkl, gate = cfg.weights(teacher.entropy)
    fkl = topk_forward_kl(lp_top, teacher.topk_logprobs, cfg.tail_bucket)
    metrics = {
        "fkl": fkl,
        "teacher_entropy": teacher.entropy,
        "student_entropy": student_entropy,
        "gate": gate,
        "student_topk_mass": lp_top.exp().sum(-1),
        "teacher_topk_mass": teacher.topk_logprobs.exp().sum(-1),
    }
    if old_logprobs is None:  # teacher-forced data: objective fkl only (no PPO term, no metrics)
        if cfg.name != "fkl":
            raise ValueError(
                f"objective {cfg.name!r} needs old_logprobs (the rollout's log p_old(y_t)): only "
                "'fkl' trains without the student's own samples"
            )
        return w_fkl * fkl, {k: v.detach().float() for k, v in metrics.items()}
    advantages = (teacher.token_logprobs - old_logprobs).detach().to(lp_y.dtype)
    pg, ratio, clipped = ppo_clip_loss(lp_y, old_logprobs.to(lp_y.dtype), advantages, cfg.clip_eps)
    metrics.update(pg_loss=pg, advantage=advantages, ratio=ratio, clip_frac=clipped,
                   rkl_sampled=old_logprobs - teacher.token_logprobs)  # fmt: skip
    loss = w_rkl * pg + w_fkl * fkl
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def exact_objective(
    cfg: ObjectiveConfig,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group=None,
    vocab_size=None,
):
    """Full-vocabulary form from the teacher's logits shard (same [s, b, V_pad / tp] layout).

    Returns (per_token_loss [s, b], metrics dict of detached [s, b] tensors).
    Collectives: forward 1 all-gather (2 for jsd); backward none.
    """
    kw = dict(
        temperature=cfg.temperature, tp_group=tp_group, vocab_size=vocab_size,
        chunk_size=cfg.chunk_size,
    )  # fmt: skip
    if cfg.name == "jsd":
        terms = vocab_parallel_jsd(student_logits, teacher_logits, beta=cfg.jsd_beta, **kw)
        return terms["jsd"], {k: v.detach().float() for k, v in terms.items()}
    terms = vocab_parallel_kl_terms(student_logits, teacher_logits, **kw)
    w_rkl, w_fkl, gate = cfg.weights(terms["teacher_entropy"])
    loss = w_rkl * terms["rkl"] + w_fkl * terms["fkl"]
    metrics = {k: v.detach().float() for k, v in terms.items()}
    metrics["gate"] = gate.float()
    return loss, metrics


def linear_sampled_objective(
    cfg: ObjectiveConfig,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher: TeacherPayload,
    *,
    tp_group=None,
    vocab_size=None,
    reduce_hidden_grad: bool = True,
    grad_weights: torch.Tensor | None = None,
):
    """`sampled_objective` on the logits `student_hidden @ student_weight.T`, fused with the
    output layer: no logits materialised.

    Args:
        student_hidden: [s, b, h]; student_weight: [V_pad / tp, h]; the rest as sampled_objective;
        grad_weights [s, b] (optional): the upstream gradient the loss will get, up to a scalar
        (the loss mask): one pass (`fused_rows.linear_row_loss`: each chunk's gradient made in
        the forward pass, 3 student matmuls per chunk instead of 4); any other upstream gradient
        still gets the exact gradient (the chunks are recomputed).
    Returns:
        (per_token_loss [s, b] with gradients to student_hidden and student_weight, metrics).
    Collectives: grad_weights None: per chunk none, forward 1 all-gather of [s*b, 5 + k]; with
    grad_weights: 1 all-gather of [chunk, 5 + k] per chunk. Backward 1 SUM all-reduce of the
    [s*b, h] hidden-state gradient (none with reduce_hidden_grad=False or at TP 1).
    """
    ids = torch.cat([token_ids.unsqueeze(-1), teacher.topk_ids], dim=-1)
    kw = dict(
        temperature=cfg.temperature, tp_group=tp_group, vocab_size=vocab_size,
        chunk_size=cfg.fused_chunk_size, reduce_hidden_grad=reduce_hidden_grad,
    )  # fmt: skip
    if grad_weights is None:
        logprobs, student_entropy = vocab_parallel_linear_logprobs_and_entropy(
            student_hidden, student_weight, ids, **kw
        )
        return _sampled_terms(cfg, logprobs, student_entropy, old_logprobs, teacher)
    flat_old = None if old_logprobs is None else old_logprobs.reshape(-1)
    flat_teacher = TeacherPayload(
        *(t.reshape(token_ids.numel(), *t.shape[len(token_ids.shape) :]) for t in teacher)
    )

    def row_fn(rows, logprobs, entropy):
        rows_teacher = TeacherPayload(*(t[rows] for t in flat_teacher))
        old = None if flat_old is None else flat_old[rows]
        return _sampled_terms(cfg, logprobs, entropy, old, rows_teacher)[0]

    loss, logprobs, student_entropy = linear_row_loss(
        student_hidden, student_weight, ids, row_fn, grad_weights, **kw
    )
    _, metrics = _sampled_terms(cfg, logprobs, student_entropy, old_logprobs, teacher)
    return loss, metrics


def linear_exact_objective(
    cfg: ObjectiveConfig,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    tp_group=None,
    vocab_size=None,
    reduce_hidden_grad: bool = True,
    grad_weights: torch.Tensor | None = None,
):
    """`exact_objective` on the two models' output-layer products, fused with the output layers
    (`fused.linear_pair_loss`). Every objective but `jsd` (ValueError: use the unfused form).
    `grad_weights` [s, b]: the upstream gradient expected up to a scalar (the loss mask), so that
    the gradients are made in the forward pass (see `vocab_parallel_linear_eopd_loss`).

    Returns (per_token_loss [s, b], metrics dict of detached [s, b] tensors).
    Collectives: forward 1 all-gather of [s*b, 9] (with grad_weights: one of [chunk, 9] per
    chunk); backward 1 SUM all-reduce of [s*b, h] (none with reduce_hidden_grad=False or at TP 1).
    """
    if cfg.name == "jsd":
        raise ValueError("objective 'jsd' has no fused form; set loss.fused_output=false")
    loss, metrics = linear_pair_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, cfg.weights, grad_weights,
        temperature=cfg.temperature, tp_group=tp_group, vocab_size=vocab_size,
        chunk_size=cfg.fused_chunk_size, reduce_hidden_grad=reduce_hidden_grad,
    )  # fmt: skip
    return loss, {k: v.detach().float() for k, v in metrics.items()}
