"""Build the run's parallel layouts, the trainable student and the frozen teacher from a config.

The student and the teacher each get a named megatron layout ("student", "teacher"; see
:func:`megatron_eaopd.parallel.init.initialize_layouts`), so they may use different TP/PP on the
same ranks. Each model is built, loaded and run inside its own layout.
"""

from __future__ import annotations

import logging

from megatron_eaopd.config import EAOPDConfig, model_kwargs
from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant

logger = logging.getLogger(__name__)

__all__ = [
    "STUDENT",
    "TEACHER",
    "build_student",
    "build_teacher",
    "init_layouts",
    "model_configs",
    "optim_config",
]

STUDENT, TEACHER = "student", "teacher"


def model_configs(cfg: EAOPDConfig, vocab_size: int) -> tuple[ModelConfig, ModelConfig]:
    """(student, teacher) model shapes; ``vocab_size`` fills ``model.*.vocab_size: 0``."""
    div = cfg.parallel.make_vocab_size_divisible_by
    student = ModelConfig(**model_kwargs(cfg.model.student, vocab_size, div))
    teacher = ModelConfig(**model_kwargs(cfg.model.teacher, vocab_size, div))
    return student, teacher


def init_layouts(cfg: EAOPDConfig) -> dict:
    """Start torch.distributed (env://) and create the student and teacher layouts.

    Seeds megatron's RNG tracker with ``training.seed``. Collectives: the rendezvous and the
    new_group calls of both layouts (every rank calls this once).
    """
    from megatron_eaopd.parallel.init import initialize_layouts

    p = cfg.parallel
    backend = None if p.backend == "auto" else p.backend
    return initialize_layouts(
        {
            STUDENT: (p.student.tp, p.student.pp, p.student.vpp),
            TEACHER: (p.teacher.tp, p.teacher.pp, p.teacher.vpp),
        },
        seed=cfg.training.seed,
        backend=backend,
    )


def optim_config(cfg: EAOPDConfig, total_steps: int):
    """The student's ``models.student.OptimConfig`` (warm-up counted in optimizer steps)."""
    from megatron_eaopd.models.student import OptimConfig

    o = cfg.optimizer
    return OptimConfig(
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        warmup_steps=o.warmup_iterations,
        total_steps=total_steps,
    )


def build_trainable(mcfg: ModelConfig, optim, seed: int, schedule: str = "cosine"):
    """Build chunks under the current layout, initialise them from ``seed`` (layout-invariant),
    wrap them in megatron DDP with AdamW and the LR schedule; return a ``Student``.

    The model config gets ``calculate_per_token_loss=True`` (the losses return token sums).
    """
    from megatron_eaopd.models.student import setup_student

    chunks = build_model(mcfg, calculate_per_token_loss=True)
    init_weights_layout_invariant(chunks, seed)
    student = setup_student(chunks, optim)
    student.scheduler.lr_decay_style = schedule
    return student


def build_student(
    cfg: EAOPDConfig, mcfg: ModelConfig, total_steps: int, init_checkpoint: str | None = None
):
    """The trainable student under the "student" layout.

    Initialised from ``init_checkpoint`` or ``model.student_checkpoint`` when set (weights only,
    any layout), else randomly from ``training.seed``. Returns a ``models.student.Student``.
    """
    from megatron_eaopd.models.checkpoint import load_checkpoint
    from megatron_eaopd.parallel.init import use_layout

    with use_layout(STUDENT):
        student = build_trainable(
            mcfg, optim_config(cfg, total_steps), cfg.training.seed, cfg.optimizer.lr_schedule
        )
        init_checkpoint = init_checkpoint or cfg.model.student_checkpoint
        if init_checkpoint:
            load_checkpoint(init_checkpoint, student.chunks, load_rng=False)
    return student


def build_teacher(mcfg: ModelConfig, checkpoint_root: str):
    """The frozen teacher under the "teacher" layout, loaded from ``checkpoint_root``."""
    from megatron_eaopd.models.checkpoint import load_teacher
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import use_layout

    with use_layout(TEACHER):
        teacher = FrozenTeacher(build_model(mcfg))
        load_teacher(checkpoint_root, teacher)
    return teacher
