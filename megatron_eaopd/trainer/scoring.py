"""The trainer's teacher pass: attach the teacher's view of the rollouts to the micro-batches.

* sampled form (the paper): :func:`score_with_teacher` routes each student replica's micro-batches
  to the teacher under its own layout and stores the compact payload (entropy, sampled-token
  log-prob, top-k) under "teacher" (:func:`megatron_eaopd.models.scoring.score_for_student`);
* exact form: :func:`attach_teacher_logits` stores the teacher's logits shard (or, fused with the
  output layer, its hidden states and output weight), which needs the teacher's TP group to be
  the student's.
"""

from __future__ import annotations

import torch

from megatron_eaopd.trainer.batches import attach_teacher, on_device
from megatron_eaopd.trainer.build import STUDENT, TEACHER

__all__ = ["attach_teacher_logits", "score_with_teacher"]


def score_with_teacher(
    teacher, micro_batches: list[dict], *, k: int, vocab_size: int, temp: float, chunk_size=None,
    fused: bool = True, fused_chunk_size=None,
):  # fmt: skip
    """Attach the teacher's payload to each micro-batch of this rank (call on every rank).

    On the student's last pipeline stage "teacher" holds a TeacherPayload with [b, s] and
    [b, s, k] fields (the loss's layout); on other stages None (they never compute the loss).
    ``fused`` (loss.fused_output; the default for callers that do not pass it, e.g. the plugin):
    the payload comes from the teacher's final hidden states and output weight shard,
    ``fused_chunk_size`` tokens at a time (``losses.vocab_parallel_linear_teacher_payload``);
    otherwise from its logits, ``chunk_size`` tokens per kernel chunk.
    Collectives: those of ``score_for_student``.
    """
    from megatron_eaopd.losses._common import NonFiniteLogitsError
    from megatron_eaopd.models.scoring import score_for_student

    try:
        payloads = score_for_student(
            teacher, micro_batches, k=k, vocab_size=vocab_size, teacher_layout=TEACHER,
            student_layout=STUDENT, temperature=temp, chunk_size=chunk_size, fused=fused,
            fused_chunk_size=fused_chunk_size,
        )  # fmt: skip
    except NonFiniteLogitsError as err:
        # found where the statistics are checked, the teacher's last pipeline stage, and agreed
        # by every rank (score_for_student): each raises this, whatever its stage
        dtype = next(p.dtype for c in teacher.chunks for p in c.parameters())
        hint = (
            "fp16 overflows above 65504: set model.teacher.dtype=bf16 on a GPU of compute "
            "capability 8.0 or later, else fp32"
            if dtype == torch.float16 else "check the teacher's checkpoint for non-finite weights"
        )  # fmt: skip
        raise NonFiniteLogitsError(
            f"the teacher ({str(dtype).removeprefix('torch.')}) scored the rollouts with "
            f"non-finite logits ({err}): {hint}"
        ) from err
    attach_teacher(micro_batches, payloads)


def attach_teacher_logits(teacher, micro_batches: list[dict], *, fused: bool = False) -> None:
    """Exact form: store the teacher's logits shard [b, s, V_pad / tp] (fp32) under "teacher", or
    with ``fused`` the pair (final hidden states [b, s, h_t], output weight shard
    [V_pad / tp, h_t]) for the loss fused with the output layers (no logits materialised).

    Runs a plain forward of the (TP-only) teacher under its layout on this rank's micro-batches,
    which are those of the student's data-parallel replica: with the same TP size and no
    pipeline, the teacher's TP group is the student's, so each rank holds the vocabulary shard its
    student logits are paired with. Collectives: the teacher's TP all-reduces.
    """
    from megatron_eaopd.losses.output_layer import hidden_states_output
    from megatron_eaopd.parallel.init import use_layout

    with use_layout(TEACHER):
        for mb in micro_batches:
            dev = on_device({"tokens": mb["tokens"], "position_ids": mb["position_ids"]})
            args = (dev["tokens"], dev["position_ids"], None)
            if fused:
                with hidden_states_output(teacher.chunks[0]) as weight:
                    mb["teacher"] = (teacher(*args), weight)
            else:
                mb["teacher"] = teacher(*args).float()
