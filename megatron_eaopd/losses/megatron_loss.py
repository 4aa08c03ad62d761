"""The EOPD loss as a megatron-core `loss_func`, and the reduction of its logged metrics.

megatron-core's schedules call `forward_step(data_iterator, model) -> (output_tensor, loss_func)`
and, on the last pipeline stage, `loss_func(output_tensor) -> (loss, num_tokens, reported)`.
With `calculate_per_token_loss=True` in the model config, megatron sums `loss` over micro-batches
and `finalize_model_grads` divides the gradients by the number of tokens all-reduced over the
data-parallel group: the loss is normalised by the number of valid tokens in the GLOBAL batch,
which is the paper's token mean. `loss_func` therefore returns the masked SUM of per-token losses.

`reported` maps each metric to a [2] tensor (numerator, denominator) over the micro-batch;
`reduce_metrics` adds them over micro-batches (and ranks) and divides, so every logged mean is
exact, not a mean of means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megatron_eaopd.losses.kl import high_entropy
from megatron_eaopd.losses.objectives import (
    ObjectiveConfig,
    exact_objective,
    linear_exact_objective,
    linear_sampled_objective,
    sampled_objective,
)
from megatron_eaopd.losses.statistics import TeacherPayload


@dataclass
class DistillMicroBatch:
    """What the loss needs for one micro-batch, in the logits' leading layout ([b, s] for
    megatron-core GPTModel outputs, which are [b, s, V_pad / tp]).

    token_ids: [b, s] int64, the token each position's logits predict (the next token).
    loss_mask: [b, s] bool/0-1, True on response tokens that count.
    old_logprobs: [b, s] log p_old(token) from the rollout (sampled form).
    teacher: TeacherPayload with [b, s] / [b, s, k] fields (sampled form), or the teacher's
        [b, s, V_pad / tp] logits shard (exact form), or (teacher hidden [b, s, h_t], teacher
        output weight [V_pad / tp, h_t]) for the exact form fused with the output layer.
    """

    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    teacher: TeacherPayload | torch.Tensor | tuple
    old_logprobs: torch.Tensor | None = None


def check_megatron_config(model_config) -> None:
    """Refuse a megatron config that would normalise the loss per micro-batch instead of per
    global token count."""
    if not getattr(model_config, "calculate_per_token_loss", False):
        raise ValueError(
            "the EOPD loss_func returns a token SUM; set calculate_per_token_loss=True in the "
            "megatron model config so the loss is normalised by the global number of valid tokens"
        )


def compute_per_token_loss(cfg: ObjectiveConfig, logits, mb: DistillMicroBatch, tp_group=None,
                           vocab_size=None, output_weight=None):  # fmt: skip
    """Dispatch to the sampled or exact objective: (per_token_loss [b, s], metrics).

    With `output_weight` ([V_pad / tp, h], fused with the output layer, `fused.py`), `logits` are
    the student's final hidden states [b, s, h] and, in the exact form, `mb.teacher` is the pair
    (teacher hidden states [b, s, h_t], teacher output weight [V_pad / tp, h_t]); both forms then
    make their gradients in the forward pass for the loss mask (`grad_weights`: one pass over the
    logits chunks, one all-gather per chunk).
    """
    if cfg.form == "sampled":
        if not isinstance(mb.teacher, TeacherPayload):
            given = (
                "the teacher's logits or hidden states (EOPDTeacher.attach_logits), which "
                "only the exact form reads (objective eopd_exact or jsd, or form 'exact'; "
                "--eopd-objective eopd_exact)"
                if mb.teacher is not None
                else "nothing"
            )
            raise ValueError(
                f"objective {cfg.name!r} in the sampled form needs a TeacherPayload in "
                f"mb['teacher'] (EOPDTeacher.attach(micro, k=..., vocab_size=...)); it holds "
                f"{given}"
            )  # fmt: skip
        if mb.old_logprobs is None and cfg.name != "fkl":
            raise ValueError(
                f"objective {cfg.name!r} in the sampled form needs old_logprobs (the rollout's "
                "log-probs of the student's own samples); on teacher-forced data use objective "
                "fkl, or the exact form"
            )
        if output_weight is not None:
            return linear_sampled_objective(
                cfg, logits, output_weight, mb.token_ids, mb.old_logprobs, mb.teacher,
                tp_group=tp_group, vocab_size=vocab_size,
                grad_weights=mb.loss_mask.to(logits.dtype),
            )  # fmt: skip
        return sampled_objective(
            cfg, logits, mb.token_ids, mb.old_logprobs, mb.teacher, tp_group=tp_group,
            vocab_size=vocab_size,
        )  # fmt: skip
    if output_weight is not None:
        if not (isinstance(mb.teacher, tuple) and len(mb.teacher) == 2):
            raise ValueError(
                "the fused exact objective needs mb.teacher = (teacher hidden states, teacher "
                "output weight)"
            )
        if mb.teacher[1].shape[0] != output_weight.shape[0]:
            raise ValueError(_padding_text(output_weight.shape[0], mb.teacher[1].shape[0]))
        return linear_exact_objective(
            cfg, logits, output_weight, *mb.teacher, tp_group=tp_group, vocab_size=vocab_size,
            grad_weights=mb.loss_mask.to(logits.dtype),
        )  # fmt: skip
    if not isinstance(mb.teacher, torch.Tensor):
        raise ValueError("the exact objective needs the teacher's logits shard as mb.teacher")
    if mb.teacher.shape[-1] != logits.shape[-1]:
        raise ValueError(_padding_text(logits.shape[-1], mb.teacher.shape[-1]))
    return exact_objective(cfg, logits, mb.teacher, tp_group=tp_group, vocab_size=vocab_size)


def _padding_text(student: int, teacher: int) -> str:
    """The refusal of an exact-form pair whose vocabulary shards differ in width."""
    return (
        f"the student's vocabulary shard has {student} columns and the teacher's {teacher}: the "
        "exact form compares them column by column, so both must pad the vocabulary alike. "
        "EOPDTeacher pads to teacher.model_config.padded_vocab_size(tp) (a multiple of "
        "1024 for HF imports up to TP 8); build the student with that padded size "
        "(Megatron-LM: --make-vocab-size-divisible-by 1024 / tp up to TP 8, else 128), or use "
        "the sampled form (attach), which takes any padding"
    )


def make_loss_func(cfg: ObjectiveConfig, mb: DistillMicroBatch, *, tp_group=None,
                   vocab_size=None, output_weight=None):  # fmt: skip
    """Build megatron's loss_func for one micro-batch.

    `output_weight` [V_pad / tp, h]: the loss is fused with the output layer and loss_func takes
    the student's final hidden states [b, s, h] (`output_layer.hidden_states_output`) instead of
    logits (see `compute_per_token_loss`).

    loss_func(output_tensor [b, s, V_pad / tp]) -> (loss_sum [], num_tokens [] int, reported)
    where loss_sum = sum over valid tokens of L_t (gradient to the student logits) and reported
    holds [2] (numerator, denominator) tensors: every per-token metric averaged over valid
    tokens, `fkl_gated` (forward KL over gated tokens only; not for jsd), `teacher_high_entropy` and
    `student_high_entropy` (fractions of tokens with entropy >= tau, > tau with
    `cfg.gate_strict`: the gate's own comparison).
    """

    def loss_func(output_tensor):
        mask = mb.loss_mask.to(torch.bool)
        batch = _finite_old_logprobs(cfg, mb, mask)
        per_token, metrics = compute_per_token_loss(
            cfg, output_tensor, batch, tp_group, vocab_size, output_weight
        )
        if mask.shape != per_token.shape:
            raise ValueError(
                f"loss_mask {list(mask.shape)} must match the logits' leading dims "
                f"{list(per_token.shape)}"
            )
        loss_sum = torch.where(mask, per_token, 0.0).sum()
        maskf = mask.float()
        n = maskf.sum()
        reported = {"loss": torch.stack([loss_sum.detach().float(), n])}
        for name, value in metrics.items():
            reported[name] = torch.stack([torch.where(mask, value, 0.0).sum(), n])
        if "gate" in metrics and "fkl" in metrics:  # every objective but jsd
            gate = metrics["gate"] * maskf
            reported["fkl_gated"] = torch.stack([(metrics["fkl"] * gate).sum(), gate.sum()])
        tau = cfg.entropy_threshold
        for who in ("teacher", "student"):
            high = high_entropy(metrics[f"{who}_entropy"], tau, cfg.gate_strict).float() * maskf
            reported[f"{who}_high_entropy"] = torch.stack([high.sum(), n])
        return loss_sum, mask.sum().to(torch.int), reported

    return loss_func


def _finite_old_logprobs(cfg: ObjectiveConfig, mb: DistillMicroBatch, mask: torch.Tensor):
    """``mb`` with its old log-probs [b, s] set to 0 where the loss mask is False (a NaN or inf
    there would reach the gradient through the masked-out PPO term: 0 * inf = NaN); ValueError
    if a trained position's is not finite (a rollout can only sample tokens of finite
    log-probability; a caller's own sampler may have written -inf or NaN). One host sync."""
    old = mb.old_logprobs
    if cfg.form != "sampled" or old is None:
        return mb
    if tuple(old.shape) != tuple(mask.shape):
        raise ValueError(
            f"old_logprobs {list(old.shape)} must have the loss mask's shape {list(mask.shape)}"
        )
    bad = mask & ~torch.isfinite(old)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"old_logprobs hold {float(old[row, col])} at a trained position ([{row}, {col}], "
            "loss_mask True): the rollout's log p_old of a sampled token must be finite. NaN "
            "means the student's logits were not finite when it sampled (a diverged student, "
            "non-finite weights: lower the learning rate, resume from an earlier checkpoint); "
            "-inf, a sampler that drew a token of probability 0 (masked positions may hold "
            "anything)"
        )
    return replace(mb, old_logprobs=torch.where(mask, old, torch.zeros_like(old)))


def reduce_metrics(reported: list[dict], group=None) -> dict[str, float]:
    """Sum [numerator, denominator] pairs over micro-batches (and over `group`'s ranks when
    given: one SUM all-reduce) and divide. Metrics with a zero denominator are NaN-free: 0."""
    if not reported:
        return {}
    names = sorted(reported[0])
    stacked = torch.stack([torch.stack([r[k].double() for k in names]) for r in reported]).sum(0)
    if group is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(stacked, group=group)
    out = {}
    for name, (num, den) in zip(names, stacked.tolist()):
        out[name] = num / den if den > 0 else 0.0
    return out
