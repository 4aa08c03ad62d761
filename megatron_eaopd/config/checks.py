"""Run-time checks of a loaded config: what needs the world size, the hardware or the vocabulary.

:func:`load_config` checks every field on its own and the cross-field rules of the schema.
:func:`check_run` adds what depends on the job: the world size (``WORLD_SIZE``) must be a multiple
of each model's ``tp * pp``; ``parallel.sequence_parallel`` needs ``parallel.student.tp > 1``; the
sampled form needs ``loss.temperature == rollout.temperature``; math-verify must be installed when
``eval.use_math_verify`` asks for it; bf16 needs a GPU of compute capability 8.0 or later; and,
once the tokenizer is known, every top-k is bounded by the vocabulary, and no model may have fewer
embedding rows than the tokenizer has ids. It makes no collective and creates no process group,
so the CLI calls it before anything starts (exit status 2 on a problem), and the trainer calls it
again in ``setup``.
"""

from __future__ import annotations

import os

from megatron_eaopd.config.hf_models import hf_sources, recorded_model_config
from megatron_eaopd.config.loader import ConfigError
from megatron_eaopd.config.schema import EAOPDConfig

__all__ = ["check_run", "run_problems", "sequence_parallel_problem", "vocab_problems"]


def fused_jsd_problem(loss) -> str | None:
    """The problem with ``loss.fused_output: true`` for ``loss.objective: jsd`` (no fused form),
    None otherwise (shared by the run checks and the plugin's flags)."""
    if loss.objective == "jsd" and loss.fused_output:
        return ("true is refused for loss.objective=jsd, which has no loss fused with the output "
                "layer; set loss.fused_output=null (or false)")  # fmt: skip
    return None


def sequence_parallel_problem(cfg: EAOPDConfig, cuda_available: bool = True) -> str | None:
    """Why ``parallel.sequence_parallel: true`` cannot run (None when it can, or is false).

    Sequence parallelism applies to the student (``models.sequence_parallel``): megatron splits
    its activations outside the tensor-parallel regions over the sequence across the student's
    tp ranks, so it needs ``parallel.student.tp > 1``. It runs on GPU and on CPU (gloo has the
    reduce-scatter and all-gather it needs since torch 2.x; without TE or apex the student's
    norms are torch norms tagged for the sequence-parallel gradient all-reduce). Rollouts decode
    with it switched off; training sequences are padded to a multiple of tp. ``cuda_available``
    is kept for callers; nothing depends on it.
    """
    if not cfg.parallel.sequence_parallel:
        return None
    tp = cfg.parallel.student.tp
    if tp < 2:
        return (
            f"true needs tensor parallelism for the student (parallel.student.tp={tp}; it must "
            "be > 1): sequence parallelism splits the sequence over the tp ranks. Set "
            "parallel.student.tp > 1 or parallel.sequence_parallel=false"
        )
    return None


def run_problems(
    cfg: EAOPDConfig,
    world_size: int,
    vocab_size: int | None = None,
    *,
    cuda_available: bool | None = None,
    math_verify_installed: bool | None = None,
    gpu: tuple[str, int, int] | None = None,
) -> list[tuple[str, str]]:
    """The ``(key, message)`` problems :func:`check_run` raises (empty when there are none)."""
    problems: list[tuple[str, str]] = []
    if world_size < 1:
        problems.append(("WORLD_SIZE", f"{world_size} must be >= 1"))
    for who in ("student", "teacher"):
        lay = getattr(cfg.parallel, who)
        size = lay.tp * lay.pp
        if world_size >= 1 and world_size % size:
            problems.append(
                (
                    f"parallel.{who}.tp",
                    f"tp * pp = {lay.tp} * {lay.pp} = {size} must divide the world size "
                    f"{world_size} (WORLD_SIZE); allowed: tp * pp in "
                    f"{_divisors(world_size)}",
                )
            )
    bf16 = "bf16" in (cfg.model.student.dtype, cfg.model.teacher.dtype)
    teacher_trained = cfg.teacher_prep.enabled and not (
        cfg.model.teacher_checkpoint or cfg.model.teacher_hf
    )  # teacher_prep trains the teacher in its dtype
    half_teacher = teacher_trained and cfg.model.teacher.dtype != "fp32"
    backend = cfg.parallel.backend
    if cfg.model.student.dtype != "fp32" or backend != "auto" or bf16 or half_teacher:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
    sp_problem = sequence_parallel_problem(cfg)
    if sp_problem is not None:
        problems.append(("parallel.sequence_parallel", sp_problem))
    if cfg.model.student.dtype != "fp32" and not cuda_available:
        problems.append(
            (
                "model.student.dtype",
                f"{cfg.model.student.dtype} needs CUDA: megatron's mixed-precision optimizer "
                "keeps fp32 main weights only for CUDA tensors. Train the student in fp32 on CPU "
                "(model.student.dtype=fp32; a teacher loaded from model.teacher_hf or "
                "model.teacher_checkpoint may stay bf16)",
            )
        )
    if half_teacher and not cuda_available:
        problems.append(
            (
                "model.teacher.dtype",
                f"{cfg.model.teacher.dtype} needs CUDA here: teacher_prep.enabled trains the "
                "teacher, and megatron's mixed-precision optimizer keeps fp32 main weights only "
                "for CUDA tensors. Set model.teacher.dtype=fp32 on CPU, or load a teacher "
                "(model.teacher_hf / model.teacher_checkpoint), which may be bf16",
            )
        )
    problems += _bf16_problems(cfg, cuda_available, gpu)
    problems += _local_rank_problems(cuda_available)
    if cfg.parallel.backend == "nccl" and not cuda_available:
        problems.append(
            (
                "parallel.backend",
                "nccl needs CUDA devices (none here): set parallel.backend=auto (gloo on CPU)",
            )
        )
    s_lay, t_lay = cfg.parallel.student, cfg.parallel.teacher
    sends = max(s_lay.pp, t_lay.pp) > 1 or (s_lay.tp, s_lay.pp) != (t_lay.tp, t_lay.pp)
    # the end-of-run export gathers a split student's blocks on rank 0 by send / recv
    sends = sends or bool(cfg.training.export_hf) and s_lay.tp * s_lay.pp > 1
    if backend == "gloo" and cuda_available and sends:
        problems.append(
            (
                "parallel.backend",
                "gloo cannot send CUDA tensors from rank to rank (torch's gloo has no GPU "
                "send / recv), which pipeline stages, a teacher at another layout than the "
                "student's and the export of a split student (training.export_hf) need: set "
                "parallel.backend=auto (nccl with CUDA), or CUDA_VISIBLE_DEVICES= to run on CPU",
            )
        )
    if fused_jsd_problem(cfg.loss):
        problems.append(("loss.fused_output", fused_jsd_problem(cfg.loss)))
    if cfg.loss.form == "sampled" and cfg.loss.temperature != cfg.rollout.temperature:
        problems.append(
            (
                "loss.temperature",
                f"{cfg.loss.temperature} must equal rollout.temperature={cfg.rollout.temperature} "
                "for loss.form=sampled: the PPO ratio and the sampled-token advantage are taken "
                "against the distribution the tokens were drawn from. Set "
                f"loss.temperature={cfg.rollout.temperature} (or "
                f"rollout.temperature={cfg.loss.temperature})",
            )
        )
    if cfg.eval.use_math_verify:
        if math_verify_installed is None:
            from megatron_eaopd.data.answers import math_verify_available

            math_verify_installed = math_verify_available()
        if not math_verify_installed:
            problems.append(
                (
                    "eval.use_math_verify",
                    "true needs the math-verify package, which is not installed: "
                    "`pip install math-verify` (or megatron-eaopd[math]), or set "
                    "eval.use_math_verify=null (use it when installed) or false",
                )
            )
    problems += vocab_problems(cfg, vocab_size)
    bound = vocab_size
    where = "the tokenizer's vocabulary"
    for who in ("student", "teacher"):
        rows = getattr(cfg.model, who).vocab_size
        if rows and (bound is None or rows < bound):  # no id beyond a model's embedding rows
            bound, where = rows, f"model.{who}.vocab_size"
    if bound is not None:
        for key, value, least in (
            ("loss.top_k", cfg.loss.top_k, 1),
            ("rollout.top_k", cfg.rollout.top_k, 0),
            ("eval.top_k", cfg.eval.top_k, 0),
        ):
            if value > bound:
                problems.append(
                    (key, f"out of range: {value} (must be >= {least} and <= {where}, {bound})")
                )
    return problems


def vocab_problems(cfg: EAOPDConfig, vocab_size: int | None) -> list[tuple[str, str]]:
    """A model whose embedding has fewer rows (``model.<who>.vocab_size``; for a model given as
    an HF folder or a recorded checkpoint, its config.json's or record's) than the tokenizer has
    ids: those ids would have no row (``models.vocab_check``, which the trainer runs only after
    the process group exists). Empty while the tokenizer is unknown; 0 is the tokenizer's size."""
    if vocab_size is None:
        return []
    problems = []
    for who in ("student", "teacher"):
        rows = getattr(cfg.model, who).vocab_size
        if not rows or rows >= vocab_size:
            continue
        folder = getattr(cfg.model, f"{who}_hf")
        root = None
        if not folder:
            root = getattr(cfg.model, f"{who}_checkpoint")
            root = root if recorded_model_config(root) is not None else None
        text = f"{rows} embedding rows are fewer than the tokenizer's {vocab_size} ids"
        path = os.path.abspath(cfg.tokenizer.path) if cfg.tokenizer.path else None
        models = {w: os.path.abspath(f) for w, (f, _) in hf_sources(cfg).items()}
        where = f"{folder}/config.json" if folder else f"the checkpoint {root}"
        if (folder or root) and path and path == models.get(who):  # its own tokenizer
            fix = (f" (the rows come from {where}, the tokenizer is that model's own): its "
                   "config.json disagrees with its tokenizer; restore the folder from the "
                   "model's source")  # fmt: skip
        elif (folder or root) and path and path in models.values():  # the other model's
            fix = (f" (the rows come from {where}; the tokenizer is {path}, the other "
                   "model's): teacher and student must share one vocabulary")  # fmt: skip
        elif folder or root:  # the rows are the model's: the tokenizer is the wrong one
            fix = (f" (the rows come from {where}): the tokenizer (tokenizer.kind="
                   f"{cfg.tokenizer.kind}, tokenizer.path={cfg.tokenizer.path}) is not this "
                   "model's; use its own (tokenizer.kind=auto, tokenizer.path=null)")  # fmt: skip
        else:
            fix = (f": set model.{who}.vocab_size=0 (the tokenizer's size) or at least "
                   f"{vocab_size}")  # fmt: skip
        problems.append((f"model.{who}.vocab_size", text + fix))
    return problems


def check_run(
    cfg: EAOPDConfig,
    world_size: int,
    vocab_size: int | None = None,
    *,
    cuda_available: bool | None = None,
    math_verify_installed: bool | None = None,
    gpu: tuple[str, int, int] | None = None,
) -> None:
    """Refuse a config that cannot run on ``world_size`` ranks, listing every problem.

    Args:
        cfg: a config from :func:`load_config`.
        world_size: the number of ranks (``WORLD_SIZE``; 1 without a launcher).
        vocab_size: the tokenizer's vocabulary size when known (after ``prepare_data``): bounds
            ``loss.top_k``, ``rollout.top_k`` and ``eval.top_k``; None: only a non-zero
            ``model.*.vocab_size`` bounds them.
        cuda_available: whether CUDA is usable; None: ``torch.cuda.is_available()`` (read only
            when ``model.student.dtype`` is not fp32).
        math_verify_installed: None: try the import (only when ``eval.use_math_verify`` is true).
        gpu: ``(name, major, minor)`` of the CUDA device; None: read from the current device
            when CUDA is usable and a model is bf16 (bf16 needs compute capability 8.0).

    Raises:
        ConfigError: each problem with its key and the allowed values. No collective, no
            process group.
    """
    problems = run_problems(
        cfg,
        world_size,
        vocab_size,
        cuda_available=cuda_available,
        math_verify_installed=math_verify_installed,
        gpu=gpu,
    )
    if problems:
        raise ConfigError(problems, f"{world_size} rank{'s' if world_size != 1 else ''}")


def _local_rank_problems(cuda_available: bool | None) -> list[tuple[str, str]]:
    """More processes on a node than GPUs it shows: LOCAL_RANK 8 of 16 processes took GPU 8 % 8
    = 0, two ranks on one GPU (out of memory, or NCCL's duplicate-GPU error, much later). A
    process that sees one GPU has its own (srun --gpus-per-task=1, --gpu-bind): allowed."""
    if cuda_available is False:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < count or count == 1:
        return []
    return [
        (
            "LOCAL_RANK",
            f"{local}, but this node shows {count} GPU{'s' if count != 1 else ''} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start "
            "at most one process per GPU (torchrun --nproc-per-node, sbatch --ntasks-per-node, "
            "EAOPD_NPROC_PER_NODE)",
        )
    ]


def _bf16_problems(cfg: EAOPDConfig, cuda_available: bool, gpu) -> list[tuple[str, str]]:
    """bf16 on a CUDA device before compute capability 8.0 (V100 7.0, T4 7.5): torch emulates
    it there, an order of magnitude slower, and fused kernels (Transformer Engine, flash
    attention) refuse it. fp16 is the half precision those cards have."""
    if not cuda_available:
        return []
    if gpu is None:
        import torch

        if not torch.cuda.is_available() or torch.version.hip:
            return []
        # this process's GPU (the launcher's LOCAL_RANK; the device is not set yet)
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        gpu = (torch.cuda.get_device_name(index), *torch.cuda.get_device_capability(index))
    name, major, minor = gpu
    if major >= 8:
        return []
    return [
        (
            f"model.{who}.dtype",
            f"bf16 needs a GPU of compute capability 8.0 or later (Ampere: A100, H100); this "
            f"{name} is {major}.{minor}, where bf16 is emulated, many times slower, and fused "
            f"kernels refuse it. Set model.{who}.dtype=fp16 (or fp32)",
        )
        for who in ("student", "teacher")
        if getattr(cfg.model, who).dtype == "bf16"
    ]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
