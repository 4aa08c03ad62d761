"""Cross-field rules of a loaded config that span sections (checked by :func:`load_config`).

Each rule returns ``(key, message)`` problems naming the fix; :func:`rule_problems` runs them all
on a config whose derived fields are resolved. What needs the job (the world size, the hardware,
the tokenizer) is :mod:`megatron_eaopd.config.checks`; what needs files or the prepared data is
:mod:`megatron_eaopd.trainer.checks`. Reads the config only: no files, no communication.
"""

from __future__ import annotations

import dataclasses

from megatron_eaopd.config.schema import EAOPDConfig, LossConfig, TaskConfig

__all__ = [
    "TASK_KEYS_READ",
    "layout_rule_problems",
    "loss_key_problems",
    "optimizer_steps",
    "plot_problems",
    "prep_problems",
    "rule_problems",
    "task_key_problems",
    "unread_loss_warning",
    "unread_setting_problems",
    "warmup_problems",
]

#: The ``task.*`` keys each task reads besides ``task.name``. A ``module:Class`` task may read
#: any of them (``Class.from_config(task_cfg)``), so it is not checked. ``task.synthetic`` is not
#: refused for ``jsonl`` either: it is the built-in task's section, which configs inherit from
#: their ``defaults:`` (``configs/tiny-cpu.yaml`` sets it) and which nothing else reads.
TASK_KEYS_READ = {
    "builtin": ("synthetic",),
    "jsonl": ("train_file", "distill_file", "eval_files", "prompt_suffix", "synthetic"),
}
_WHO_READS = {
    "train_file": "task.name=jsonl",
    "distill_file": "task.name=jsonl",
    "eval_files": "task.name=jsonl",
    "prompt_suffix": "task.name=jsonl",
    "options": "a module:Class task",
    "synthetic": "task.name=builtin",
}


def layout_rule_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """Each model's shape must split over its layout: ``ModelConfig.check_layout``'s rules (heads,
    query groups and the MLP's inner width divisible by tp, layers by pp x vpp), here at load
    instead of after the teacher's preparation in ``build_model``."""
    from megatron_eaopd.models.config import layout_problems

    problems = []
    for who in ("student", "teacher"):
        m, lay = getattr(cfg.model, who), getattr(cfg.parallel, who)
        names = {k: f"model.{who}.{k}" for k in ("layers", "heads", "query_groups", "ffn_hidden")}
        for axis, text in layout_problems(
            m.layers, m.heads, m.query_groups, m.ffn_hidden, lay.tp, lay.pp, lay.vpp, names
        ):
            problems.append((f"parallel.{who}.{axis}", text))
    return problems


def optimizer_steps(cfg: EAOPDConfig, num_prompts: int | None) -> tuple[int, str] | None:
    """The run's student optimizer steps and how they are counted, or None when unknown:
    ``training.iterations`` (else ``training.epochs`` over ``num_prompts`` distillation prompts,
    None when not known yet) times ``rollout.prompts_per_iteration / rollout.mini_batch_size``."""
    t, r = cfg.training, cfg.rollout
    per_iteration = r.prompts_per_iteration // r.mini_batch_size
    if per_iteration == 0:  # refused on its own (rollout.mini_batch_size)
        return None
    if t.iterations is not None:
        iterations, how = t.iterations, f"training.iterations={t.iterations}"
    elif num_prompts is not None and num_prompts >= r.prompts_per_iteration:
        from megatron_eaopd.data.sampling import run_iterations

        iterations = run_iterations(cfg, num_prompts)
        how = f"{iterations} iterations (training.epochs={t.epochs} over {num_prompts} prompts)"
    else:
        return None
    how += (
        f" x rollout.prompts_per_iteration={r.prompts_per_iteration} / "
        f"rollout.mini_batch_size={r.mini_batch_size}"
    )
    return iterations * per_iteration, how


def warmup_problems(cfg: EAOPDConfig, num_prompts: int | None) -> list[tuple[str, str]]:
    """``optimizer.warmup_iterations`` beyond the run's optimizer steps: the learning rate would
    never reach ``optimizer.lr``. ``num_prompts``: the distillation prompts when known (the
    built-in task's ``num_distill`` at load, the prepared data's count later)."""
    steps = optimizer_steps(cfg, num_prompts)
    warmup = cfg.optimizer.warmup_iterations
    if steps is None or warmup <= steps[0]:
        return []
    return [
        (
            "optimizer.warmup_iterations",
            f"{warmup} exceeds the run's {steps[0]} optimizer steps ({steps[1]}): the learning "
            f"rate would never reach optimizer.lr={cfg.optimizer.lr}. Set "
            f"optimizer.warmup_iterations <= {steps[0]} (0: no warm-up), or train longer",
        )
    ]


def prep_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """A preparation that will run (enabled, its model given neither as a checkpoint nor as an HF
    folder) must train at least one step: with 0 the teacher would stay random (the reason a
    teacher without a checkpoint needs teacher_prep), and the student's warm start would be none."""
    problems = []
    for who in ("teacher", "student"):
        prep = getattr(cfg, f"{who}_prep")
        given = getattr(cfg.model, f"{who}_checkpoint") or getattr(cfg.model, f"{who}_hf")
        if not prep.enabled or given or prep.iterations >= 1:
            continue
        fix = (
            "give model.teacher_checkpoint or model.teacher_hf"
            if who == "teacher"
            else "set student_prep.enabled=false for a randomly initialised student"
        )
        problems.append(
            (
                f"{who}_prep.iterations",
                f"{prep.iterations} with {who}_prep.enabled=true: the {who} would keep its "
                f"random initialisation. Set {who}_prep.iterations >= 1, or {fix}",
            )
        )
    return problems


def task_key_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """A ``task.*`` key set to other than its default that the chosen task does not read (a
    prompt file given to the built-in task, options to the jsonl task): it would be ignored."""
    name = cfg.task.name
    if name not in TASK_KEYS_READ:
        return []
    defaults = TaskConfig()
    problems = []
    for f in dataclasses.fields(TaskConfig):
        if f.name == "name" or f.name in TASK_KEYS_READ[name]:
            continue
        value = getattr(cfg.task, f.name)
        if value == getattr(defaults, f.name):
            continue
        shown = "set" if dataclasses.is_dataclass(value) else repr(value)
        problems.append(
            (
                f"task.{f.name}",
                f"{shown} is not read by task.name={name} (it applies to "
                f"{_WHO_READS[f.name]}) and would be ignored: remove it, or choose that task",
            )
        )
    return problems


#: Who reads each objective-specific ``loss.*`` key: (objectives, forms or None for any). The
#: top-k size, tau and the strict gate are not here: the evaluation's metrics read them always.
_LOSS_READERS = {
    "clip": (("opd", "eopd", "eopd_soft", "mix"), ("sampled",)),  # the PPO term
    "tail_bucket": (("eopd", "eopd_soft", "mix", "fkl"), ("sampled",)),  # the top-k forward KL
    "fkl_coef": (("eopd", "eopd_soft", "eopd_exact"), None),
    "soft_gate_width": (("eopd_soft",), None),
    "mix_weight": (("mix",), None),
    "jsd_beta": (("jsd",), None),
}


def _unread_loss_keys(cfg: EAOPDConfig) -> list[tuple[str, str, str]]:
    """``(key, value as written, who reads it)`` of each ``loss.*`` key set to other than its
    default that the chosen objective and form do not read."""
    loss, defaults, out = cfg.loss, LossConfig(), []
    for key, (objectives, forms) in _LOSS_READERS.items():
        value = getattr(loss, key)
        read = loss.objective in objectives and (forms is None or loss.form in forms)
        if read or value == getattr(defaults, key):
            continue
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        where = " or ".join(objectives) + (f" in the {forms[0]} form" if forms else "")
        out.append((f"loss.{key}", shown, f"loss.objective={where}"))
    return out


def loss_key_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """A ``loss.*`` key set to other than its default that the chosen objective and form do not
    read (``loss.clip`` in the exact form, ``loss.mix_weight`` without ``mix``): a sweep over it
    would train identical runs. The plugin refuses such flags; the trainer warns
    (:func:`unread_loss_warning`: a config that sets ``loss.fkl_coef`` must still run
    ``loss.objective=opd`` for a comparison, and an override cannot remove an inherited key)."""
    run = f"loss.objective={cfg.loss.objective} with loss.form={cfg.loss.form}"
    return [
        (key, f"{shown} is not read by {run} (it applies to {readers}) and would be ignored: "
              "remove it, or choose that objective and form")
        for key, shown, readers in _unread_loss_keys(cfg)
    ]  # fmt: skip


def unread_loss_warning(cfg: EAOPDConfig) -> str | None:
    """The trainer's warning of :func:`loss_key_problems` (None without any)."""
    unread = _unread_loss_keys(cfg)
    if not unread:
        return None
    keys = "; ".join(f"{key}={shown} (read by {readers})" for key, shown, readers in unread)
    return (f"{keys}: not read by loss.objective={cfg.loss.objective} with "
            f"loss.form={cfg.loss.form}, so without effect in this run")  # fmt: skip


def unread_setting_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """Settings that only another setting reads, given without it (after ``tokenizer.kind: auto``
    is resolved): a path the task tokenizer ignores, pipelined decoding without any pipeline.
    (``tokenizer.enable_thinking`` without the chat template is not refused: the paper configs
    set it, and turning the template off by an override would need a second one.)"""
    tok, problems = cfg.tokenizer, []
    if tok.kind == "task" and tok.path:
        problems.append(
            (
                "tokenizer.path",
                f"{tok.path!r} is not read by tokenizer.kind=task, which trains a tokenizer on the "
                "task's text (kind auto chooses task when no model.teacher_hf, model.student_hf "
                "or imported checkpoint's folder holds a tokenizer): set tokenizer.kind="
                "sentencepiece (a .model file) or huggingface (a tokenizer folder), or remove "
                "tokenizer.path",
            )
        )
    if cfg.rollout.pp_interleave and cfg.parallel.student.pp == cfg.parallel.teacher.pp == 1:
        problems.append(
            (
                "rollout.pp_interleave",
                "true overlaps decoding over pipeline stages (the student's rollouts, and each "
                "model's evaluation), and neither model is pipelined: remove it, or set "
                "parallel.student.pp > 1",
            )
        )
    return problems


def interleave_warning(cfg: EAOPDConfig, cuda_available: bool | None = None) -> str | None:
    """``rollout.pp_interleave`` under NCCL (backend nccl, or auto with CUDA): its hidden-state
    sends and its draws' broadcasts use two communicators in an order that differs between
    stages, which NCCL does not promise to complete; it has run on gloo only (None otherwise)."""
    if not cfg.rollout.pp_interleave or cfg.parallel.backend == "gloo":
        return None
    if cfg.parallel.backend == "auto":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            return None
    return (
        "rollout.pp_interleave has run on gloo only: under NCCL its sends between stages and "
        "its broadcasts of the draws use two communicators in an order that differs between "
        "stages, which NCCL does not promise to complete (a hang until the NCCL timeout is "
        "possible; docs/trainer.md, Interleaved groups under PP). Remove it if the first rollout "
        "or evaluation does not finish"
    )


def recompute_warning(cfg: EAOPDConfig, te: bool | None = None) -> str | None:
    """``training.recompute: selective`` with Transformer Engine (``te``: installed; None: look):
    its fused attention keeps no [s, s] scores, so selective recompute saves nothing there."""
    if cfg.training.recompute != "selective":
        return None
    if te is None:
        from megatron_eaopd.models.builder import te_available

        te = te_available()
    if not te:
        return None
    return (
        "training.recompute=selective recomputes the core attention, for which Transformer "
        "Engine's fused attention (used here) keeps no [s, s] scores: it saves nothing and costs "
        "one more attention forward per layer. Use full (each layer's input kept) or none"
    )


def plot_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """``eval.plot`` draws eval_curves.png from <output_dir>/metrics.jsonl, which
    ``logging.jsonl: false`` does not write."""
    if cfg.eval.plot and not cfg.logging.jsonl:
        return [
            (
                "logging.jsonl",
                "false with eval.plot=true: eval_curves.png (and the before/after table printed "
                "at the end) are drawn from <output_dir>/metrics.jsonl, which would not be "
                "written. Set logging.jsonl=true, or eval.plot=false",
            )
        ]
    return []


def rule_problems(cfg: EAOPDConfig) -> list[tuple[str, str]]:
    """Every rule of this module on ``cfg`` (derived fields resolved)."""
    num_prompts = cfg.task.synthetic.num_distill if cfg.task.name == "builtin" else None
    return [
        *layout_rule_problems(cfg),
        *warmup_problems(cfg, num_prompts),
        *prep_problems(cfg),
        *task_key_problems(cfg),
        *unread_setting_problems(cfg),
        *plot_problems(cfg),
    ]
