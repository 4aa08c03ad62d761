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
    """(student, teacher) model shapes; ``vocab_size`` fills ``model.*.vocab_size: 0``.

    A model given as an HF folder (``model.<who>_hf``) takes its architecture from config.json
    (``models.hf.model_config_from_hf``: RoPE scaling, q/k/v biases and the source
    architecture included), with the config's dtype, ``max_seq_len`` and
    ``parallel.make_vocab_size_divisible_by``. A model given as a project checkpoint that
    records its config (``model.<who>_checkpoint``: an ``eaopd-convert import-hf`` output, a
    trainer save) takes that config whole (q/k/v biases, RoPE scaling and the vocabulary
    padding it was saved with included), with the config's dtype and ``max_seq_len``.
    """
    from megatron_eaopd.config.hf_models import recorded_model_config

    div = cfg.parallel.make_vocab_size_divisible_by
    out = []
    for who in ("student", "teacher"):
        section, folder = getattr(cfg.model, who), getattr(cfg.model, f"{who}_hf")
        kwargs = model_kwargs(section, vocab_size, div)
        root = getattr(cfg.model, f"{who}_checkpoint")
        recorded = None if folder else recorded_model_config(root)
        if recorded is not None:  # the checkpoint's own architecture (biases, RoPE, padding)
            out.append(
                recorded.with_changes(
                    params_dtype=kwargs["params_dtype"],
                    max_sequence_length=kwargs["max_sequence_length"],
                )
            )
        elif folder:
            from megatron_eaopd.models.hf import model_config_from_hf

            out.append(
                model_config_from_hf(
                    folder,
                    params_dtype=kwargs["params_dtype"],
                    max_sequence_length=kwargs["max_sequence_length"],
                    make_vocab_size_divisible_by=div,
                )
            )
        else:
            out.append(ModelConfig(**kwargs))
    return out[0], out[1]


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


def build_trainable(
    mcfg: ModelConfig, optim, seed: int, schedule: str = "cosine", sequence_parallel: bool = False,
    recompute: str = "none",
):  # fmt: skip
    """Build chunks under the current layout, initialise them from ``seed`` (layout-invariant),
    wrap them in megatron DDP with AdamW and the LR schedule; return a ``Student``.

    The model config gets ``calculate_per_token_loss=True`` (the losses return token sums);
    ``sequence_parallel``: megatron sequence parallelism (``models.sequence_parallel``);
    ``recompute``: activation recomputation, a key of ``models.builder.RECOMPUTE``
    (``training.recompute``).
    """
    from megatron_eaopd.models.builder import RECOMPUTE
    from megatron_eaopd.models.student import setup_student

    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: one of {sorted(RECOMPUTE)}")
    chunks = build_model(mcfg, calculate_per_token_loss=True, sequence_parallel=sequence_parallel,
                         **RECOMPUTE[recompute])  # fmt: skip
    init_weights_layout_invariant(chunks, seed)
    student = setup_student(chunks, optim)
    student.scheduler.lr_decay_style = schedule
    return student


def build_student(
    cfg: EAOPDConfig, mcfg: ModelConfig, total_steps: int, init_checkpoint: str | None = None
):
    """The trainable student under the "student" layout.

    With megatron sequence parallelism when ``parallel.sequence_parallel`` is true and the
    activation recomputation ``training.recompute`` names. Initialised from ``init_checkpoint``
    or ``model.student_checkpoint`` when set (weights only, any layout), from the HF folder
    ``model.student_hf`` (each rank reads its own slices), else randomly from
    ``training.seed``. After loading, the optimizer's fp32 main copies of bf16 /
    fp16 weights are refreshed from the model (megatron's ``reload_model_params``): they were
    made from the random initialisation. Returns a ``models.student.Student``.
    """
    from megatron_eaopd.models.checkpoint import load_checkpoint
    from megatron_eaopd.parallel.init import use_layout

    with use_layout(STUDENT):
        student = build_trainable(
            mcfg, optim_config(cfg, total_steps), cfg.training.seed, cfg.optimizer.lr_schedule,
            sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.training.recompute,
        )  # fmt: skip
        init_checkpoint = init_checkpoint or cfg.model.student_checkpoint
        if init_checkpoint:
            load_checkpoint(init_checkpoint, student.chunks, load_rng=False)
            student.optimizer.reload_model_params()
        elif cfg.model.student_hf:
            from megatron_eaopd.models.hf import load_hf_weights

            load_hf_weights(student.chunks, cfg.model.student_hf, progress=_bars(cfg))
            student.optimizer.reload_model_params()
    return student


def build_teacher(mcfg: ModelConfig, checkpoint_root: str | None, hf_dir: str | None = None):
    """The frozen teacher under the "teacher" layout, loaded from the project checkpoint
    ``checkpoint_root`` or the HF folder ``hf_dir`` (each rank reads its own slices)."""
    from megatron_eaopd.models.checkpoint import load_teacher
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import use_layout

    with use_layout(TEACHER):
        teacher = FrozenTeacher(build_model(mcfg))
        if hf_dir:
            from megatron_eaopd.models.hf import load_hf_weights

            load_hf_weights(teacher, hf_dir)
        else:
            load_teacher(checkpoint_root, teacher)
    return teacher


def _bars(cfg: EAOPDConfig) -> bool:
    """Progress bars as the trainer draws them: asked for, rank 0, stderr a terminal."""
    import torch.distributed as dist

    from megatron_eaopd.trainer.loop import _on_terminal

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return bool(cfg.logging.progress_bars) and rank0 and _on_terminal()
