"""A teacher whose logits overflow (fp16 above 65504) or hold NaN: the trainer's scoring raises on
every rank, naming the teacher and its dtype and what to set, instead of the statistics' generic
"logits contain NaN or +inf" (2 gloo ranks: student TP 1 x DP 2; the teacher at TP 2, and at PP 2,
where only its last stage sees the logits and the first must not be left waiting)."""

from __future__ import annotations

import dataclasses

import torch

from tests.dist import run_distributed
from tests.models import helpers
from tests.trainer.test_fused_update import PADDED, SAMPLES, VOCAB, make_rollouts


def _worker(rank, world, teacher_layout=(2, 1, None), cases=("fp16", "nan")):
    from megatron_eaopd.losses._common import NonFiniteLogitsError
    from megatron_eaopd.models import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts, use_layout
    from megatron_eaopd.trainer.batches import step_micro_batches
    from megatron_eaopd.trainer.scoring import score_with_teacher

    rollouts = make_rollouts()
    t_cfg = dataclasses.replace(helpers.preset("tiny-teacher"), vocab_size=PADDED)
    messages = []
    for case in cases:
        destroy_parallel()
        initialize_layouts({"student": (1, 1, None), "teacher": teacher_layout}, seed=3)
        with use_layout("teacher"):
            chunks = build_model(t_cfg)
            init_weights_layout_invariant(chunks, 4)
            with torch.no_grad():
                for name, p in chunks[0].named_parameters():  # on the last stage only
                    if name.endswith("output_layer.weight"):
                        p.mul_(1e6) if case == "fp16" else p[0, 0].fill_(float("nan"))
            if case == "fp16":
                chunks = [c.half() for c in chunks]
            teacher = FrozenTeacher(chunks)
        rows = list(range(rank * SAMPLES, (rank + 1) * SAMPLES))
        mine = type(rollouts)(**{k: v[rows] for k, v in rollouts.__dict__.items()})
        with use_layout("student"):
            micro = step_micro_batches(mine, 0, 2)[0]
        try:
            score_with_teacher(teacher, micro, k=4, vocab_size=VOCAB, temp=1.0, fused=False)
            messages.append("")
        except NonFiniteLogitsError as err:
            messages.append(str(err))
    destroy_parallel()
    return messages


def test_non_finite_teacher_logits_name_the_teacher_and_the_fix():
    results = run_distributed(_worker, 2, timeout=300)
    for fp16, nan in results:  # every rank raises
        assert fp16.startswith("the teacher (float16) scored the rollouts with non-finite logits")
        assert "set model.teacher.dtype=bf16 on a GPU of compute capability 8.0 or later" in fp16
        assert nan.startswith("the teacher (float32) scored the rollouts with non-finite logits")
        assert "check the teacher's checkpoint for non-finite weights" in nan


def test_non_finite_logits_of_a_pipelined_teacher_raise_on_every_stage():
    """Teacher PP 2: the last stage finds them, the first stage raises too (it used to wait in
    the payload exchange until the launcher ended it)."""
    results = run_distributed(_worker, 2, (1, 2, None), ("nan",), timeout=300)
    for rank, (nan,) in enumerate(results):
        assert nan.startswith("the teacher (float32) scored the rollouts with non-finite logits")
        # the first stage is told where they were found, the last what they were
        other = "the teacher's last pipeline stage (other ranks) found non-finite logits"
        assert (other in nan) == (rank == 0), nan
        assert "check the teacher's checkpoint for non-finite weights" in nan
