"""megatron-core ``forward_step`` functions and batch builders for a user-owned training loop.

Megatron's contract (``get_forward_backward_func``)::

    forward_step(data_iterator, model) -> (output_tensor, loss_func)
    loss_func(output_tensor) -> (loss_sum, num_tokens, {name: tensor([numerator, denominator])})

with ``calculate_per_token_loss=True`` in the model's TransformerConfig: megatron divides the
gradients by the valid tokens of the global batch (the paper's token mean), and Megatron-LM's
``train_step`` sums the reported pairs and divides, as it does for ``lm loss``.

Micro-batches are dicts of [b, s] tensors, label-aligned like GPT training data: "tokens",
"position_ids", "labels" (the next token), "loss_mask" (True where the label is trained),
"old_logprobs" (on-policy: log p_old(label) from the rollout; offline: zeros, unused by the
objectives that allow offline data) and "teacher" (set by ``EOPDTeacher.attach`` /
``attach_logits``).
"""

from __future__ import annotations

import torch

__all__ = [
    "check_offline",
    "eopd_forward_step",
    "offline_micro_batches",
    "rollout_micro_batches",
]


def check_offline(objective) -> None:
    """Teacher-forced (offline) data has no samples of the student: only objectives without the
    sampled-token reverse KL apply, i.e. ``fkl`` (the teacher's top-k forward KL) or any
    objective in the exact form (full-vocabulary KL terms, teacher logits). ValueError else."""
    if objective.form != "exact" and objective.name != "fkl":
        raise ValueError(
            f"objective {objective.name!r} in the sampled form needs the student's own samples "
            "(the PPO-clipped reverse KL): use it on-policy, or train offline with objective "
            "fkl, or with the exact form (loss form 'exact': full teacher logits)"
        )


def eopd_forward_step(objective, vocab_size: int):
    """A megatron forward_step_func for EOPD / OPD / the variants (``losses.ObjectiveConfig``).

    Runs the caller's model (``model(tokens, position_ids, None)``: a GPTModel returning
    [b, s, V_pad / tp] logits on the last stage) and returns ``losses.make_loss_func``'s
    loss_func: loss_sum over valid tokens, the valid-token count, and every metric as a
    [numerator, denominator] pair ("loss", "pg_loss", "fkl", "rkl_sampled", "gate",
    "teacher_high_entropy", ...). Only the last pipeline stage reads "teacher".
    Collectives in loss_func: one TP all-gather (sampled form) or one (exact form); backward none.
    """
    from megatron_eaopd.losses import DistillMicroBatch, make_loss_func
    from megatron_eaopd.trainer.batches import on_device

    def forward_step(data_iterator, model):
        mb = on_device(next(data_iterator))
        output = model(mb["tokens"], mb["position_ids"], None)
        batch = DistillMicroBatch(mb["labels"], mb["loss_mask"], mb.get("teacher"),
                                  mb.get("old_logprobs"))  # fmt: skip
        return output, make_loss_func(objective, batch, vocab_size=vocab_size)

    return forward_step


def offline_micro_batches(tokens: torch.Tensor, loss_mask: torch.Tensor, micro_batch_size: int):
    """Teacher-forced micro-batches from a dataset batch (the ModelOpt style).

    Args:
        tokens: [B, S + 1] int64 sequences; loss_mask: [B, S + 1] bool, True on the tokens to
            learn (it applies to the label, i.e. position t + 1 of the sequence).
    Returns:
        micro-batches of ``micro_batch_size`` rows with [b, S] "tokens", "labels",
        "position_ids", "loss_mask" and zero "old_logprobs".
    """
    b, width = tokens.shape
    s = width - 1
    batch = {
        "tokens": tokens[:, :s].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        "loss_mask": loss_mask[:, 1:].contiguous().bool(),
        "old_logprobs": torch.zeros(b, s),
    }
    from megatron_eaopd.trainer.batches import split_micro_batches

    return split_micro_batches(batch, micro_batch_size)


def rollout_micro_batches(rollouts, pad_id: int, micro_batch_size: int, multiple: int = 1):
    """On-policy micro-batches from a ``rollout.RolloutBatch`` (``rollout.generate``'s output or
    the caller's own sampler filled in the same fields): the response tokens are trained, the
    rollout's log-probs are the PPO ratio's denominator.

    ``multiple``: pad the sequence length to a multiple of this with masked pad tokens; a student
    built with sequence parallelism needs ``models.sequence_parallel.sequence_multiple(model)``
    (its TP size)."""
    from megatron_eaopd.trainer.batches import collate, split_micro_batches

    return split_micro_batches(collate(rollouts, pad_id, multiple=multiple), micro_batch_size)
