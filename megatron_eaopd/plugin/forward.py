"""megatron-core ``forward_step`` functions and batch builders for a user-owned training loop.

Megatron's contract (``get_forward_backward_func``)::

    forward_step(data_iterator, model) -> (output_tensor, loss_func)
    loss_func(output_tensor) -> (loss_sum, num_tokens, {name: tensor([numerator, denominator])})

with ``calculate_per_token_loss=True`` in the model's TransformerConfig: megatron divides the
gradients by the valid tokens of the global batch (the paper's token mean), and Megatron-LM's
``train_step`` sums the reported pairs and divides, as it does for ``lm loss``.

Micro-batches are dicts of [b, s] tensors, label-aligned like GPT training data: "tokens",
"position_ids", "labels" (the next token), "loss_mask" (True where the label is trained),
"old_logprobs" (on-policy: log p_old(label) from the rollout; offline: absent, as the
objectives that allow offline data do not read it) and "teacher" (set by ``EOPDTeacher.attach`` /
``attach_logits``).
"""

from __future__ import annotations

import torch

__all__ = [
    "check_micro_batch",
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


#: The keys every micro-batch dict of the plugin holds.
_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def check_micro_batch(mb: dict, objective=None) -> None:
    """Refuse a micro-batch without one of ``_KEYS`` (named, with what builds them), and what
    the plugin's models and teacher would silently get wrong (ValueError):
    packed sequences (``packed_seq_params``, THD: the loss and the teacher take [b, s] rows),
    and a teacher payload with another top-k width than ``objective.top_k`` (``attach`` was
    given another ``k``; objectives with a forward KL term, not ``opd``). The width is the
    payload's on the last pipeline stage and the ``"teacher_k"`` that ``EOPDTeacher.attach``
    records on every rank, so every stage refuses it at its first micro-batch (no stage is left
    waiting for a peer that stopped); likewise a payload scored at another temperature than
    ``objective.temperature`` (the ``"teacher_temperature"`` that ``attach`` records). An
    ``attention_mask`` is not passed on: the student
    and the teacher run megatron's causal attention, which is what Megatron-LM's default mask
    says (its document masking flags are refused by ``eopd_settings_from_args``). With an
    ``objective``, a micro-batch that ``attach`` / ``attach_logits`` never saw is refused on
    every stage (was: on the last stage only, the others left waiting). No communication."""
    from megatron_eaopd.losses import TeacherPayload

    missing = [k for k in _KEYS if k not in mb]
    if missing:
        raise ValueError(
            f"a micro-batch without {', '.join(missing)}: the plugin's forward_step reads a dict "
            f'with {", ".join(_KEYS)} ([b, s] each), "teacher" (EOPDTeacher.attach / '
            'attach_logits) and, on-policy, "old_logprobs" (rollout_micro_batches / '
            "offline_micro_batches build them)"
        )
    if mb.get("packed_seq_params") is not None:
        raise ValueError(
            "packed sequences (packed_seq_params) are not supported: the teacher and the loss "
            "take [b, s] micro-batches; turn sequence packing off in your data pipeline"
        )
    teacher = mb.get("teacher")
    if objective is not None and teacher is None and mb.get("teacher_k") is None:
        raise ValueError(  # every stage: attach records teacher_k on each, a payload or not
            "a micro-batch without a teacher: call teacher.attach(micro, k=..., vocab_size=...) "
            "on every rank before the schedule (on-policy, or a teacher at another layout), or "
            "teacher.attach_logits([mb]) inside forward_step (offline, exact form)"
        )
    temperature = mb.get("teacher_temperature")
    if objective is not None and temperature is not None and temperature != objective.temperature:
        raise ValueError(
            f"the teacher payload was scored at temperature {temperature} but the objective's "
            f"temperature is {objective.temperature}: call teacher.attach(micro, "
            "temperature=settings.objective.temperature, ...)"
        )
    k = teacher.topk_ids.shape[-1] if isinstance(teacher, TeacherPayload) else mb.get("teacher_k")
    # opd uses the payload's sampled-token log-prob only: any top-k width serves it
    if objective is not None and objective.name != "opd" and k is not None:
        if k != objective.top_k:
            raise ValueError(
                f"the teacher payload has {k} top-k columns but the objective's top_k is "
                f"{objective.top_k}: call teacher.attach(micro, k=settings.objective.top_k, ...)"
            )


def eopd_forward_step(objective, vocab_size: int, *, fused: bool | None = None):
    """A megatron forward_step_func for EOPD / OPD / the variants (``losses.ObjectiveConfig``).

    Runs the caller's model (``model(tokens, position_ids, None)``: a GPTModel returning
    [b, s, V_pad / tp] logits on the last stage) and returns ``losses.make_loss_func``'s
    loss_func: loss_sum over valid tokens, the valid-token count, and every metric as a
    [numerator, denominator] pair ("loss", "pg_loss", "fkl", "rkl_sampled", "gate",
    "teacher_high_entropy", ...). Only the last pipeline stage reads "teacher".

    ``fused`` (None: ``objective.fused_output`` is True, i.e. ``--eopd-fused-output``): on the
    last pipeline stage the model runs with its output layer swapped for an identity
    (``losses.output_layer.hidden_states_output``), returns its final hidden states [b, s, h],
    and the loss is computed from them and the output weight shard [V_pad / tp, h] chunk by
    chunk (``objective.fused_chunk_size`` tokens, ``losses.fused``): no [b, s, V_pad / tp]
    logits or logits gradient exist. Same loss and metrics as unfused; the weight shard gets its
    gradient through autograd (DDP accumulates it as any parameter's), the hidden states the
    full-vocabulary gradient. In the exact form "teacher" must then be the pair (teacher hidden
    states [b, s, h_t], teacher output weight [V_pad / tp, h_t]):
    ``EOPDTeacher.attach_logits(micro, fused=True)``. Objective ``jsd`` has no fused form
    (ValueError from loss_func).
    Collectives in loss_func: unfused one TP all-gather (sampled: [b s, 5 + k]; exact: [b s, 9]),
    none in backward; fused the same all-gather (exact: one of [chunk, 9] per chunk) and in
    backward one TP all-reduce of the [b s, h] hidden-state gradient (the output layer's own,
    which the swapped-out layer no longer makes).
    """
    from megatron_eaopd.losses import DistillMicroBatch, make_loss_func
    from megatron_eaopd.losses.output_layer import hidden_states_output, is_last_stage
    from megatron_eaopd.trainer.batches import on_device

    use_fused = bool(objective.fused_output) if fused is None else bool(fused)
    checked = []  # the model's config, once

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        check_micro_batch(mb, objective)
        if not checked:
            from megatron.core.utils import get_model_config

            from megatron_eaopd.losses.megatron_loss import check_megatron_config

            config = get_model_config(model)
            check_megatron_config(config)  # every stage: none left waiting
            checked.append(bool(getattr(config, "sequence_parallel", False)))
        if checked[0]:
            _check_sequence_multiple(mb)
        mb = on_device(mb)
        batch = DistillMicroBatch(mb["labels"], mb["loss_mask"], mb.get("teacher"),
                                  mb.get("old_logprobs"))  # fmt: skip
        if use_fused and is_last_stage(model):
            with hidden_states_output(model) as weight:
                output = model(mb["tokens"], mb["position_ids"], None)
            if output.dtype != weight.dtype:  # Megatron-LM's Float16Module (--bf16 / --fp16)
                output = output.to(weight.dtype)  # returns fp32: its hidden states were bf16
            return output, make_loss_func(objective, batch, vocab_size=vocab_size,
                                          output_weight=weight)  # fmt: skip
        output = model(mb["tokens"], mb["position_ids"], None)
        return output, make_loss_func(objective, batch, vocab_size=vocab_size)

    return forward_step


def _check_sequence_multiple(mb: dict) -> None:
    """Sequence parallelism splits the [s, b, h] activations over TP: s must be a multiple of
    TP (megatron's own assertion names neither the cause nor the fix). No communication."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    rows = next((mb[k] for k in _KEYS if isinstance(mb.get(k), torch.Tensor)), None)
    if rows is not None and rows.shape[-1] % tp:
        raise ValueError(
            f"sequence parallelism needs micro-batches whose length ({rows.shape[-1]}) is a "
            f"multiple of TP ({tp}): build them with multiple=models.sequence_parallel."
            "sequence_multiple(model) (offline_micro_batches / rollout_micro_batches)"
        )


def offline_micro_batches(
    tokens: torch.Tensor, loss_mask: torch.Tensor, micro_batch_size: int, multiple: int = 1,
    pad_id: int = 0,
):  # fmt: skip
    """Teacher-forced micro-batches from a dataset batch (the ModelOpt style).

    Args:
        tokens: [B, S + 1] int64 sequences; loss_mask: [B, S + 1] bool, True on the tokens to
            learn (it applies to the label, i.e. position t + 1 of the sequence).
        multiple: pad the S positions at the end to a multiple of this with ``pad_id`` tokens
            and labels, masked out of the loss (zero old log-probs, position ids continuing
            0..S'-1); a student built with sequence parallelism needs
            ``models.sequence_parallel.sequence_multiple(model)`` (its TP size). With causal
            attention the padding changes no earlier position.
    Returns:
        micro-batches of ``micro_batch_size`` rows with [b, S'] "tokens", "labels",
        "position_ids" and "loss_mask" (S' = S rounded up to ``multiple``); no "old_logprobs":
        teacher-forced data has no rollout, and the objectives it allows (``check_offline``)
        read none, so the PPO metrics (``pg_loss``, ``ratio`` ...) are left out, not made up.
    """
    if multiple < 1 or micro_batch_size < 1:
        raise ValueError(
            f"multiple and micro_batch_size must be >= 1, got {multiple} and {micro_batch_size}"
        )
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, S + 1] with S >= 1, got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if tuple(loss_mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have the shape of tokens "
            f"{tuple(tokens.shape)} (it marks the tokens to learn)"
        )
    b, width = tokens.shape
    s = width - 1
    padded = -(-s // multiple) * multiple

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, padded - s), value=value).contiguous()

    batch = {
        "tokens": pad(tokens[:, :s], pad_id),
        "labels": pad(tokens[:, 1:], pad_id),
        "position_ids": torch.arange(padded).unsqueeze(0).expand(b, padded).contiguous(),
        "loss_mask": pad(loss_mask[:, 1:].bool(), False),
    }
    from megatron_eaopd.trainer.batches import split_micro_batches

    return split_micro_batches(batch, micro_batch_size)


def rollout_micro_batches(
    rollouts,
    pad_id: int,
    micro_batch_size: int,
    multiple: int = 1,
    by_length: bool = False,
    max_tokens: int | None = None,
):
    """On-policy micro-batches from a ``rollout.RolloutBatch`` (``rollout.generate``'s output or
    the caller's own sampler filled in the same fields): the response tokens are trained, the
    rollout's log-probs are the PPO ratio's denominator.

    ``multiple``: pad the sequence length to a multiple of this with masked pad tokens; a student
    built with sequence parallelism needs ``models.sequence_parallel.sequence_multiple(model)``
    (its TP size). ``by_length``: order the rows by length (longest first) and pad each
    micro-batch only to its own longest row (``trainer.batches.step_micro_batches``; the same
    loss, less compute on length-skewed rollouts); the widths then differ, so under pipeline
    parallelism run your schedule inside ``models.student.variable_shapes(model_chunks)`` (it sets
    ``variable_seq_lengths`` for the block) and pass the widest as ``seq_length``.
    ``max_tokens`` (needs ``by_length``): a token budget, as ``rollout.micro_batch_tokens``; each
    micro-batch holds at most that many padded positions (rows x width) and at most
    ``micro_batch_size`` rows, so the row counts differ too: pass the most rows as
    ``micro_batch_size`` to the schedule, inside ``variable_shapes`` under pipeline parallelism.
    """
    from megatron_eaopd.trainer.batches import collate, split_micro_batches, step_micro_batches

    if max_tokens is not None and not by_length:
        raise ValueError("max_tokens needs by_length=True (micro-batches cut by length)")
    if by_length:
        return step_micro_batches(rollouts, pad_id, micro_batch_size, multiple=multiple,
                                  max_tokens=max_tokens)[0]  # fmt: skip
    return split_micro_batches(collate(rollouts, pad_id, multiple=multiple), micro_batch_size)
