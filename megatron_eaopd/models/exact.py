"""Exact mode: teacher layers beside student layers on the same pipeline stages.

For small pairs the teacher's full logits can be used at loss time, so the exact full-vocabulary
EOPD (`losses.vocab_parallel_eopd_loss`) runs on the last stage. Both models are built under the
same TP x PP layout (no VPP); stage i holds student stage i and teacher stage i. Between stages the
point-to-point tensor carries both hidden states, concatenated on the hidden dim:
[s, b, h_student + h_teacher]; the pipeline schedule learns that width from the stage's config.
On the last stage the forward returns (student_logits, teacher_logits), each [b, s, V_pad / tp],
and the loss function receives that pair.

The teacher half runs under torch.no_grad(): its received hidden state is detached, its output
carries no graph, and the gradient sent back for it is zero. The student's gradients are those of
the student alone (the teacher riding along changes nothing for it).
"""

from __future__ import annotations

import copy

import torch


class ExactPairStage(torch.nn.Module):
    """One pipeline stage (one model chunk) of a student and its frozen teacher.

    Args:
        student: the student chunk, bare or wrapped in megatron DDP.
        teacher: the teacher chunk of the same stage (bare GPTModel; frozen by FrozenTeacher).
        post_process: whether this is the last pipeline stage.
    """

    def __init__(self, student, teacher, post_process: bool):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.post_process = post_process
        s_cfg, t_cfg = _config(student), _config(teacher)
        self.hidden_sizes = (s_cfg.hidden_size, t_cfg.hidden_size)
        self.model_type = _attr(student, "model_type")
        # The schedule sizes p2p buffers from config.hidden_size: a shallow copy with the sum.
        self.config = copy.copy(s_cfg)
        self.config.hidden_size = sum(self.hidden_sizes)

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received [s, b, h_s + h_t] tensor between the two models (None: 1st stage)."""
        from megatron.core.utils import get_attr_wrapped_model

        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if tensor is None:
            student_in = teacher_in = None
        else:
            student_in, teacher_in = tensor.split(list(self.hidden_sizes), dim=-1)
            teacher_in = teacher_in.detach()
        get_attr_wrapped_model(self.student, "set_input_tensor")(student_in)
        self.teacher.set_input_tensor(teacher_in)

    def forward(self, input_ids, position_ids, attention_mask=None):
        """Last stage: (student_logits, teacher_logits) [b, s, V_pad / tp] each; other stages:
        the concatenated hidden states [s, b, h_s + h_t]. Collectives: the two models' own
        (TP all-reduces / all-gathers); the schedule does the p2p."""
        student_out = self.student(input_ids, position_ids, attention_mask)
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        if self.post_process:
            return student_out, teacher_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)


def _attr(module, name):
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(module, name)


def _config(module):
    return _attr(module, "config")


def exact_pair_stages(student_chunks, teacher) -> list:
    """Pair every student chunk with the teacher chunk of the same stage.

    `student_chunks`: from `setup_student(...).chunks` (DDP-wrapped) or `build_model`;
    `teacher`: a FrozenTeacher (or its chunks) built under the same parallel state. Raises
    ValueError when the layouts do not match (different number of chunks, VPP, or hidden
    sizes that the schedule cannot carry). The stages' config routes megatron's gradient hooks
    (no_sync, finalize_model_grads) to the student chunks only. No communication.
    """
    from megatron.core import parallel_state as ps

    teacher_chunks = list(getattr(teacher, "chunks", teacher))
    student_chunks = list(student_chunks)
    if len(student_chunks) != 1 or len(teacher_chunks) != 1:
        raise ValueError(
            "exact mode supports one model chunk per rank (no virtual pipeline): build both "
            "models with vpp=None, or use the payload path (FrozenTeacher.score)."
        )
    s_cfg, t_cfg = _config(student_chunks[0]), _config(teacher_chunks[0])
    if (s_cfg.tensor_model_parallel_size, s_cfg.pipeline_model_parallel_size) != (
        t_cfg.tensor_model_parallel_size,
        t_cfg.pipeline_model_parallel_size,
    ):
        raise ValueError(
            "exact mode needs the teacher and the student at the same tp x pp: build both under "
            "one layout, or use the payload path for a teacher with its own layout."
        )
    post = ps.is_pipeline_last_stage(ignore_virtual=True)
    stages = [ExactPairStage(s, t, post) for s, t in zip(student_chunks, teacher_chunks)]
    finalize = s_cfg.finalize_model_grads_func
    if finalize is not None:

        def finalize_student_grads(model, *args, **kwargs):
            return finalize(student_chunks, *args, **kwargs)

        for stage in stages:
            stage.config.finalize_model_grads_func = finalize_student_grads
    return stages
