"""EOPD inside your own Megatron training loop (Megatron-LM, Megatron-Bridge, NeMo or a
megatron-core script): docs/plugin.md.

* :class:`EOPDTeacher`: load a frozen teacher (HF folder or project checkpoint) into the parallel
  state you already initialised, at its own TP x PP; ``attach`` scores your micro-batches into
  the compact payload (``attach_logits``: the logits shard, exact form).
* :func:`eopd_forward_step`: a ``forward_step_func`` for ``get_forward_backward_func`` whose
  ``loss_func`` returns ``(loss_sum, num_tokens, {name: [num, den]})``
  (``calculate_per_token_loss=True``); ``fused=True`` computes it from the final hidden states
  and the output weight shard, chunk by chunk, without the logits.
* :func:`offline_micro_batches` (teacher-forced data), :func:`rollout_micro_batches`
  (on-policy: ``megatron_eaopd.rollout.generate`` or your own sampler); both pad the sequence
  to a ``multiple=`` for sequence parallelism.
* :func:`add_eopd_args` / :func:`eopd_settings_from_args`: ``--eopd-*`` flags for
  Megatron-LM's ``extra_args_provider``, mapped onto the config schema.
"""

from megatron_eaopd.plugin.args import EOPDSettings, add_eopd_args, eopd_settings_from_args
from megatron_eaopd.plugin.forward import (
    check_micro_batch,
    check_offline,
    eopd_forward_step,
    offline_micro_batches,
    rollout_micro_batches,
)
from megatron_eaopd.plugin.teacher import STUDENT_LAYOUT, TEACHER_LAYOUT, EOPDTeacher

__all__ = [
    "STUDENT_LAYOUT",
    "TEACHER_LAYOUT",
    "EOPDSettings",
    "EOPDTeacher",
    "add_eopd_args",
    "check_micro_batch",
    "check_offline",
    "eopd_forward_step",
    "eopd_settings_from_args",
    "offline_micro_batches",
    "rollout_micro_batches",
]
