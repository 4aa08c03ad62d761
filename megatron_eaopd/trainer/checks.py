"""What the trainer refuses before any compute, each problem with the key and the fix (the CLI
exits 2): layouts and features the trainer does not run (``check_trainer_config``), what needs
the prepared data (``check_data_config``), and one run per output folder (``check_output_dir``).
Reads the config and files only; no communication, no process group.
"""

from __future__ import annotations

import logging
import os

import torch

from megatron_eaopd.config import EAOPDConfig
from megatron_eaopd.trainer.run_dir import (
    check_foreign_checkpoints,
    check_moved_checkpoints,
    check_unmarked_checkpoints,
    latest_checkpoint_problem,
    saved_run_config,
    within,
)

__all__ = [
    "check_data_config",
    "check_output_dir",
    "check_trainer_config",
    "layout_problems",
    "micro_batch_warning",
    "sampling_warning",
]

logger = logging.getLogger(__name__)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def check_trainer_config(cfg: EAOPDConfig, world_size: int) -> None:
    """What the trainer needs beyond the schema's checks; ValueError naming the fix."""
    problems = layout_problems(cfg)
    if cfg.rollout.cuda_graphs:
        problems += _cuda_graphs_problems(cfg)
    if not (cfg.model.teacher_checkpoint or cfg.model.teacher_hf or cfg.teacher_prep.enabled):
        problems.append(
            "no teacher: set model.teacher_hf, model.teacher_checkpoint or teacher_prep.enabled"
        )
    problems += _source_problems(cfg)
    problems += _export_problems(cfg)
    problems += _write_problems(cfg)
    if problems:
        raise ValueError("configuration not supported by the trainer:\n  " + "\n  ".join(problems))


def layout_problems(cfg: EAOPDConfig) -> list[str]:
    """The layouts the trainer refuses (virtual pipeline stages; the exact form's shared TP size
    and unpipelined teacher), from the config alone: ``eaopd-plan`` refuses them too."""
    problems = []
    if cfg.parallel.student.vpp is not None:
        problems.append(
            "parallel.student.vpp must be null: rollouts need one model chunk per rank "
            "(pipeline parallelism without virtual stages works, parallel.student.pp > 1)"
        )
    if cfg.parallel.teacher.vpp is not None:
        problems.append(
            "parallel.teacher.vpp must be null: the interleaved schedule needs at least pp "
            "micro-batches per teacher replica, which the scoring shares do not guarantee (use "
            "parallel.teacher.pp without virtual stages)"
        )
    if cfg.loss.form == "exact":
        problems += _exact_form_problems(cfg)
    return problems


def micro_batch_warning(cfg: EAOPDConfig, world_size: int) -> str | None:
    """A warning when a data-parallel replica's rows per optimizer step (its prompts of a
    mini-batch, dealt round-robin, times samples_per_prompt) have no divisor above half of
    ``rollout.micro_batch_size`` (or of the rows, when fewer): the update then runs many small
    micro-batches (7 rows and micro-batch size 4: seven of 1), a slowdown nothing else reports.
    With ``rollout.micro_batch_tokens`` no divisor is needed; the warning is then that the budget
    never binds (micro_batch_size rows, or a replica's rows per step when fewer, at the length
    limit fit in it: the budget changes nothing then). None when it is fine
    (``Trainer.setup`` logs it on rank 0)."""
    from megatron_eaopd.trainer.batches import largest_divisor

    r = cfg.rollout
    s = cfg.parallel.student
    dp = max(1, world_size // (s.tp * s.pp))
    m = r.mini_batch_size
    if r.micro_batch_tokens is not None:
        from megatron_eaopd.config.loader import longest_rollout_row

        limit = longest_rollout_row(cfg)
        rows = -(-m // dp) * r.samples_per_prompt  # the most rows of a replica per step
        most = min(r.micro_batch_size, rows)
        if most * limit <= r.micro_batch_tokens:
            if r.micro_batch_size < rows:
                fix = ("raise micro_batch_size so that short rows share larger micro-batches "
                       "(the budget still bounds long ones), or lower the budget")  # fmt: skip
            else:
                fix = f"a whole step's {rows} rows fit in it: lower the budget, or leave it null"
            return (
                f"rollout.micro_batch_tokens={r.micro_batch_tokens} never binds: "
                f"micro-batches of at most {most} rows (micro_batch_size "
                f"{r.micro_batch_size}, {rows} rows per replica and step) of at most {limit} "
                f"tokens hold at most {most * limit} positions; {fix}"
            )
        return None
    for prompts in sorted({m // dp, -(-m // dp)}):
        rows = prompts * r.samples_per_prompt
        used = largest_divisor(rows, r.micro_batch_size) if rows else 0
        if rows and 2 * used <= min(rows, r.micro_batch_size):
            return (
                f"rollout.micro_batch_size={r.micro_batch_size}: a data-parallel replica has "
                f"{rows} rows per optimizer step (mini_batch_size {m} / DP {dp} x "
                f"samples_per_prompt {r.samples_per_prompt}), whose largest divisor <= "
                f"{r.micro_batch_size} is {used}: {rows // used} micro-batches of {used}. Make "
                "mini_batch_size a multiple of DP and (mini_batch_size / DP) x "
                "samples_per_prompt a multiple of micro_batch_size"
            )
    return None


def sampling_warning(cfg: EAOPDConfig) -> str | None:
    """A warning when the training rollouts are truncated (``rollout.top_p`` < 1 or
    ``rollout.top_k`` > 0) in the sampled form: the tokens then come from the truncated
    distribution, while the rollout's log-probs (the PPO ratio's denominator) and the sampled
    reverse KL are those of the full softmax at ``rollout.temperature``, so the objective's
    estimate is biased. Allowed (some peers sample so), but not the paper's setting. None
    otherwise (``Trainer.setup`` logs it on rank 0)."""
    r = cfg.rollout
    if cfg.loss.form != "sampled" or (r.top_p >= 1.0 and r.top_k == 0):
        return None
    return (
        f"rollout.top_p={r.top_p}, rollout.top_k={r.top_k}: the training rollouts sample from a "
        "truncated distribution, but their log-probs (the PPO ratio's denominator) and the "
        "sampled reverse KL are those of the full softmax at rollout.temperature, so the "
        "on-policy estimate is biased; the paper samples with top_p 1 and no top-k "
        "(eval.top_p / eval.top_k are for evaluation)"
    )


def checkpoint_dir(cfg: EAOPDConfig) -> str:
    """The run's checkpoint folder: ``training.checkpoint_dir``, else
    ``<training.output_dir>/checkpoints``."""
    t = cfg.training
    return t.checkpoint_dir or os.path.join(t.output_dir, "checkpoints")


def will_resume(cfg: EAOPDConfig) -> bool:
    """Whether the run continues a saved one: ``training.resume`` and a ``latest`` marker in
    its checkpoint folder. Files only (the trainer shares rank 0's answer)."""
    from megatron_eaopd.models.checkpoint import LATEST

    return cfg.training.resume and os.path.isfile(os.path.join(checkpoint_dir(cfg), LATEST))


def _unwritable(folder: str) -> str | None:
    """Why no file can be created in ``folder`` (made if missing), or None. Each caller makes
    and removes its own temporary file (ranks may check at once). No communication."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.remove(path)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def _unwritable_target(folder: str) -> str | None:
    """Why ``folder`` could not be made (if missing) and hold files, or None. Makes nothing: the
    folder itself is tried when it exists, else its nearest existing ancestor (where makedirs
    would start), which must be a folder. Each caller makes and removes its own temporary file."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"NotADirectoryError: {path} is not a folder"
    return _unwritable(path)


def _write_problems(cfg: EAOPDConfig) -> list[str]:
    """The run's folders must be writable before anything is computed: otherwise the trainer
    fails when it first writes there, after the process group exists, and a checkpoint folder
    with ``training.checkpoint_interval: 0`` only at the end of the run. ``training.export_hf``
    is written next to its folder and renamed, so its parent is tried."""
    t = cfg.training
    when = {
        "training.output_dir": "the run writes its config.yaml and metrics there at the start",
        "training.checkpoint_dir": "the first save would fail"
        + (" (checkpoint_interval 0: at the end of the run)" if not t.checkpoint_interval else ""),
        "training.export_hf": "the export would fail at the end of the run",
    }
    targets = [("training.output_dir", t.output_dir, t.output_dir)]
    if t.checkpoint_dir:  # else inside output_dir
        targets.append(("training.checkpoint_dir", t.checkpoint_dir, t.checkpoint_dir))
    if t.export_hf:
        targets.append(
            ("training.export_hf", os.path.dirname(os.path.abspath(t.export_hf)), t.export_hf)
        )
    problems = []
    for key, folder, given in targets:
        why = _unwritable_target(folder)
        if why is not None:
            problems.append(
                f"{key}={given} cannot be written ({why}): {when[key]}. Point {key} at a "
                "writable folder"
            )
    return problems


def check_data_config(cfg: EAOPDConfig, data, world_size: int) -> None:
    """What needs the prepared data (``prepare_data``), before any compute. ValueError listing
    each problem with its fix:

    - a teacher / student preparation that will train (enabled, no checkpoint or HF folder for
      that model, nothing cached under its key) must split its batch over its model's
      data-parallel ranks (a cached one is reused at any world size), and must be able to
      write its cache folder (a read-only one serves cached entries only); a resumed run
      prepares no student warm start, so that one is not checked then;
    - in the exact form the student's and the teacher's padded vocabularies (the logits shards'
      widths at the shared TP size) must be equal;
    - a resume must not be shorter than the iterations its checkpoint has done, nor longer
      than its decaying learning-rate schedule planned (`run_dir.length_problem`);
    - ``optimizer.warmup_iterations`` must not exceed the run's optimizer steps, counted here
      from the prompts when ``training.iterations`` is null (the built-in task's are known,
      and checked, at load).
    """
    from megatron_eaopd.models.checkpoint import LATEST
    from megatron_eaopd.trainer.build import model_configs
    from megatron_eaopd.trainer.run_dir import length_problem
    from megatron_eaopd.trainer.teacher_prep import supervised_cache_key

    problems = [p for p in (length_problem(cfg, data),) if p]
    student, teacher = model_configs(cfg, data.vocab_size)
    resuming = will_resume(cfg)
    for who, prep, mcfg in (("teacher", cfg.teacher_prep, teacher),
                            ("student", cfg.student_prep, student)):  # fmt: skip
        if not prep.enabled or getattr(cfg.model, f"{who}_checkpoint"):
            continue
        if who == "student" and resuming:
            continue  # the run's checkpoint replaces the warm start: none is prepared
        if getattr(cfg.model, f"{who}_hf"):
            continue  # the trainer loads the folder, no preparation
        lay = getattr(cfg.parallel, who)
        dp = world_size // (lay.tp * lay.pp)
        root = os.path.join(prep.cache_dir, supervised_cache_key(data, mcfg, prep, who))
        if os.path.isfile(os.path.join(root, LATEST)):
            continue  # prepared before: reused
        unwritable = _unwritable(prep.cache_dir)
        if unwritable:
            problems.append(
                f"{who}_prep.cache_dir={prep.cache_dir} cannot be written ({unwritable}): the "
                f"{who} would be prepared and then fail to save. Point {who}_prep.cache_dir at "
                "a writable folder (a cache filled elsewhere may be read-only)"
            )
        if world_size % (lay.tp * lay.pp) or prep.batch_size % dp == 0:
            continue
        problems.append(
            f"{who}_prep.batch_size={prep.batch_size} must be a multiple of the {who}'s "
            f"data-parallel size {dp} (world {world_size} / tp {lay.tp} / pp {lay.pp}) to "
            f"prepare the {who} (nothing cached under {root}): set {who}_prep.batch_size to a "
            f"multiple of {dp}, or prepare it once at a world size whose data-parallel size "
            "divides the batch (the cache is reused at any world size)"
        )
    from megatron_eaopd.config.rules import warmup_problems

    problems += [f"{key}: {text}" for key, text in warmup_problems(cfg, len(data.distill))]
    tp = cfg.parallel.student.tp
    ps, pt = student.padded_vocab_size(tp), teacher.padded_vocab_size(tp)
    if cfg.loss.form == "exact" and ps != pt:
        problems.append(
            f"loss.form=exact: the student's and the teacher's padded vocabularies differ ({ps} "
            f"vs {pt} rows at tp {tp}; model.student.vocab_size={student.vocab_size}, "
            f"model.teacher.vocab_size={teacher.vocab_size}): the logits shards must line up. "
            "Give both models the same vocabulary size (0: the tokenizer's), or use "
            "loss.form=sampled"
        )
    if problems:
        raise ValueError("configuration not supported by the trainer:\n  " + "\n  ".join(problems))


# what defines a run's trajectory: a resume under other values would continue the saved run (its
# weights, optimizer and schedule) while the folder's config.yaml claims the new ones
_RUN_SECTIONS = ("model", "loss", "optimizer", "task", "tokenizer", "teacher_prep", "student_prep")
_RUN_KEYS = ("training.seed", "rollout.prompts_per_iteration", "rollout.samples_per_prompt",
             "rollout.mini_batch_size", "rollout.temperature", "rollout.top_p", "rollout.top_k",
             "rollout.max_prompt_tokens", "rollout.max_response_tokens",
             "parallel.make_vocab_size_divisible_by")  # fmt: skip
# inside those: derived from other keys (max_seq_len), memory and speed only (the loss kernels'
# chunking). Not the evaluation sets: the built-in tasks draw their splits after the eval set
# (num_eval moves the training and distillation problems), and eval files are part of a task
# tokenizer's corpus and of a prepared teacher's task fingerprint (see _eval_files_free)
_FREE_KEYS = ("model.student.max_seq_len", "model.teacher.max_seq_len", "loss.chunk_size",
              "loss.fused_output", "loss.fused_chunk_size")  # fmt: skip


def _eval_files_free(cfg: EAOPDConfig) -> bool:
    """Whether ``task.eval_files`` may change on resume: only when they cannot reach what is
    trained, i.e. the tokenizer is not trained on the task's text and the teacher is not
    prepared on the task (its cache key holds the task's fingerprint, eval prompts included)."""
    teacher_given = bool(cfg.model.teacher_hf or cfg.model.teacher_checkpoint)
    return cfg.tokenizer.kind != "task" and (teacher_given or not cfg.teacher_prep.enabled)


def check_output_dir(cfg: EAOPDConfig) -> None:
    """Refuse to mix two runs in one folder, before any compute (ValueError naming the fix):

    - ``training.resume: false`` where the checkpoint folder holds a run (a fresh start would
      overwrite its checkpoints and metrics; under Slurm every requeue would start again);
    - a resume whose settings that define the run (the model, loss, optimizer, task, tokenizer
      and preparation sections, the seed, the rollout sampling and batch sizes) differ from the
      folder's config.yaml. Evaluation, logging, intervals, export, layout, the loss kernels'
      chunking and derived lengths may change; a config.yaml this version cannot load is not
      compared (a warning);
    - a fresh start (no checkpoint) in a folder whose config.yaml, left by an earlier launch that
      saved no checkpoint, has other such settings: its records would pass for this run's. With
      the same settings (a restart of a run that died before its first checkpoint) rank 0 moves
      those records aside instead (``trainer.run_dir.set_aside_earlier_attempt``).
    Two live launches into one folder are the folder lock's to refuse (``trainer.run_dir``).
    Reads files only (every rank the same ones); no communication.
    """
    from megatron_eaopd.models.checkpoint import LATEST

    t = cfg.training
    ckpt_dir = checkpoint_dir(cfg)
    latest = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(latest):
        check_moved_checkpoints(t, ckpt_dir)
        check_unmarked_checkpoints(ckpt_dir, t.output_dir, t.resume)
        if os.path.isfile(latest):  # this run's own save, just marked (rank 0): a resume
            return check_output_dir(cfg)
        changed = _changed_settings(cfg)
        if changed:
            raise ValueError(
                f"training.output_dir={t.output_dir} holds an earlier launch (its config.yaml, "
                f"no checkpoint) with other settings: {'; '.join(changed)}. Starting here would "
                "replace its config.yaml and leave its metrics and evaluation samples beside "
                "this run's. Use a new training.output_dir, restore the settings (the earlier "
                "attempt's records are then moved aside), or move that folder away"
            )
        return
    with open(latest, encoding="utf-8") as f:
        name = f.read().strip()
    if not t.resume:
        where = ("training.output_dir" if not t.checkpoint_dir else
                 "training.output_dir and training.checkpoint_dir")  # fmt: skip
        raise ValueError(
            f"training.resume=false, but {ckpt_dir} holds a run ({name}): a fresh start would "
            f"overwrite its checkpoints and metrics. Use a new {where}, delete the "
            "folder, or set training.resume=true to continue that run"
        )
    check_foreign_checkpoints(cfg, ckpt_dir, name)
    problem = latest_checkpoint_problem(ckpt_dir, name) or _no_room_problem(cfg, ckpt_dir, name)
    if problem:
        raise ValueError(problem)
    changed = _changed_settings(cfg)
    if changed:
        raise ValueError(
            f"training.output_dir={t.output_dir} holds a run ({name}) with other settings: "
            + "; ".join(changed)
            + ". Resuming would continue the saved run (its weights, optimizer and learning-rate "
            "schedule) under the new settings. Use a new training.output_dir, or restore them"
        )


def _no_room_problem(cfg: EAOPDConfig, ckpt_dir: str, name: str) -> str | None:
    """A resume that will save again onto a disk without room for a save of the latest's size
    (the last attempt stopped there for want of space: it would train until its next save and
    fail again); None when there is room or the saved run is complete."""
    from megatron_eaopd.data.sampling import run_iterations
    from megatron_eaopd.models.checkpoint import complete_checkpoints, read_meta
    from megatron_eaopd.models.save_errors import space_problem

    meta = read_meta(os.path.join(ckpt_dir, name))
    extra, total = meta.get("extra", {}), cfg.training.iterations
    prompts = extra.get("sampler", {}).get("num_prompts")
    if total is None and prompts:  # from epochs: over the prompts the saved run had
        try:
            total = run_iterations(cfg, prompts)
        except ValueError:  # fewer prompts than an iteration: the resume refuses it anyway
            total = None
    if total is not None and meta.get("iteration", 0) >= total:
        return None  # nothing left to train: the rerun prints the table
    done = [n for n in complete_checkpoints(ckpt_dir) if n <= name] or [name]
    return space_problem(ckpt_dir, "the next checkpoint", done, name)


def _changed_settings(cfg: EAOPDConfig) -> list[str]:
    """The settings that define the run which differ between ``cfg`` and the config.yaml in
    ``training.output_dir`` (where that is gone, the config the latest checkpoint recorded), as
    ``key: old -> new``; none when there is neither or this version cannot load it (a
    warning)."""
    from megatron_eaopd.config import load_config
    from megatron_eaopd.config.loader import ConfigError, config_from_dict, config_to_dict, flatten

    saved_path = os.path.join(cfg.training.output_dir, "config.yaml")
    recorded = None if os.path.isfile(saved_path) else saved_run_config(checkpoint_dir(cfg))
    if recorded is None and not os.path.isfile(saved_path):
        return []
    try:  # an older version's config is read without today's cross-field rules
        if recorded is not None:  # the run folder is gone: the settings its checkpoint recorded
            saved_path = f"the settings recorded in {checkpoint_dir(cfg)}"
            saved = config_to_dict(config_from_dict(recorded, saved_path, rules=False))
        else:
            saved = config_to_dict(load_config(saved_path, rules=False))
    except (ConfigError, OSError, ValueError) as err:  # an older version's keys: not compared
        logger.warning("%s does not load with this version (%s): going on without comparing "
                       "its settings", saved_path, err)  # fmt: skip
        return []
    now = config_to_dict(cfg)
    unused = [
        f"{who}_prep."
        for who in ("teacher", "student")
        if getattr(cfg.model, f"{who}_hf") or getattr(cfg.model, f"{who}_checkpoint")
    ]

    def same(a, b):
        if isinstance(a, str) and isinstance(b, str) and os.sep in a + b:
            return os.path.realpath(a) == os.path.realpath(b)  # one file, however spelled
        return a == b

    free = _FREE_KEYS + (("task.eval_files",) if _eval_files_free(cfg) else ())

    before, after = flatten(saved), flatten(now)
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if (k.split(".")[0] in _RUN_SECTIONS or k in _RUN_KEYS)
        and not k.endswith("cache_dir")
        and k not in free
        and not k.startswith(tuple(unused))
        and not same(before.get(k), after.get(k))
    ]


def _export_problems(cfg: EAOPDConfig) -> list[str]:
    """``training.export_hf`` replaces its folder at the end of the run: it must not be (or
    contain) the run's own folders or the model / tokenizer folders, and an existing non-empty
    folder must be an earlier export of this project (``models.hf.save.is_project_export``:
    its marker file, or an earlier version's config.json) holding nothing else: a Hugging Face
    model saved by another tool in that folder would be lost."""
    from megatron_eaopd.models.hf.save import EXPORT_MARKER, TOKENIZER_FILES, is_project_export

    out = cfg.training.export_hf
    if not out:
        return []
    t, m = cfg.training, cfg.model
    real = os.path.realpath(out)
    ckpt = checkpoint_dir(cfg)
    keep = {"training.output_dir": t.output_dir, "the checkpoint folder": ckpt,
            "the run's TensorBoard folder": os.path.join(t.output_dir, "tensorboard"),
            "the run's eval_samples folder": os.path.join(t.output_dir, "eval_samples"),
            "model.teacher_hf": m.teacher_hf, "model.student_hf": m.student_hf,
            "model.teacher_checkpoint": m.teacher_checkpoint,
            "model.student_checkpoint": m.student_checkpoint, "tokenizer.path": cfg.tokenizer.path,
            "teacher_prep.cache_dir": cfg.teacher_prep.cache_dir,
            "student_prep.cache_dir": cfg.student_prep.cache_dir}  # fmt: skip
    problems = []
    for key, path in keep.items():
        if not path:
            continue
        inside = key == "the checkpoint folder" and within(out, path)
        if os.path.realpath(path) == real or within(path, out) or inside:
            where = "holds it" if inside else "is or holds it"
            problems.append(
                f"training.export_hf={out} would replace {key} ({path}): the export {where}; "
                "export into a folder of its own (e.g. <output_dir>/student-hf)"
            )
    if os.path.exists(out) and not problems and (not os.path.isdir(out) or os.listdir(out)):
        if not os.path.isdir(out) or not is_project_export(out):
            return [
                f"training.export_hf={out} exists and is not an export of this project (no "
                f"{EXPORT_MARKER}; e.g. a model saved by transformers), which the export would "
                "replace: choose a new or empty folder, or move this one away first"
            ]
        allowed = {"config.json", "generation_config.json", "model.safetensors.index.json",
                   EXPORT_MARKER, *TOKENIZER_FILES}  # fmt: skip
        foreign = sorted(n for n in os.listdir(out)
                         if not (n in allowed or n.endswith(".safetensors"))
                         or not os.path.isfile(os.path.join(out, n)))  # fmt: skip
        if foreign:
            problems.append(
                f"training.export_hf={out} exists and holds more than a Hugging Face export "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which the "
                "export would delete: choose a new or empty folder"
            )
    return problems


def _source_problems(cfg: EAOPDConfig) -> list[str]:
    """Where the models start: a project checkpoint root must exist and hold a complete save, and
    a student next to an HF teacher needs a source (a random one is a forgotten key)."""
    from megatron_eaopd.models.checkpoint import resolve_checkpoint

    problems = []
    m = cfg.model
    if m.teacher_hf and not (m.student_hf or m.student_checkpoint or cfg.student_prep.enabled):
        problems.append(
            f"the student has no source next to the Hugging Face teacher {m.teacher_hf}: it "
            "would start from random weights (configs/qwen3-8b-paper.yaml alone is the shared "
            "part of the paper configs, not a run). Set model.student_hf (as "
            "configs/qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml does), model.student_checkpoint or "
            "student_prep.enabled=true"
        )
    problems += _hf_weight_problems(cfg)
    for who in ("teacher", "student"):
        root = getattr(m, f"{who}_checkpoint")
        if not root:
            continue
        key = f"model.{who}_checkpoint={root}"
        if not os.path.isdir(root):
            what = "a file, not a folder" if os.path.exists(root) else "no such folder"
            problems.append(
                f"{key}: {what} (relative paths are taken from the current folder); "
                f"give a checkpoint root, or model.{who}_checkpoint=null"
                + (" with teacher_prep.enabled=true" if who == "teacher" else "")
            )
            continue
        try:
            resolve_checkpoint(root)
        except (OSError, ValueError) as err:
            problems.append(
                f"{key}: not a complete checkpoint root ({err}). Give the folder that holds "
                f"'latest' and the iter_* folders (a run's checkpoints/ folder, or an "
                f"`eaopd-convert import-hf` output), not an iteration folder"
            )
    return problems


def _hf_weight_problems(cfg: EAOPDConfig) -> list[str]:
    """The weight files of ``model.<who>_hf`` (headers, and a tied folder's stored head), checked
    before the layouts start and the teacher loads: a missing or truncated shard, a missing
    tensor, pickled weights (the trainer reads safetensors only)."""
    from megatron_eaopd.models.hf import check_hf_folder
    from megatron_eaopd.models.hf.reader import PickledWeights

    problems = []
    for who in ("teacher", "student"):
        folder = getattr(cfg.model, f"{who}_hf")
        if not folder:
            continue
        try:
            check_hf_folder(folder)
        except PickledWeights:
            problems.append(
                f"model.{who}_hf={folder}: the folder holds pickled weights (pytorch_model.bin) "
                "and no safetensors; the trainer reads safetensors only (loading a pickle runs "
                "code from the file). Convert it once where you trust the file: "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, "
                "safe_serialization=True), and copy the tokenizer files"
            )
        except (OSError, ValueError) as err:
            problems.append(f"model.{who}_hf={folder}: {err}")
    return problems


def _cuda_graphs_problems(cfg: EAOPDConfig) -> list[str]:
    """What ``rollout.cuda_graphs`` needs: a CUDA device, KV-cache decoding, one student stage."""
    problems = []
    if not _cuda_available():
        problems.append("rollout.cuda_graphs needs a CUDA device (none here): set it to false")
    if not cfg.rollout.use_kv_cache:
        problems.append("rollout.cuda_graphs needs rollout.use_kv_cache: true (the graphed step "
                        "is a KV-cache decode step): set one of them")  # fmt: skip
    if cfg.parallel.student.pp > 1:
        problems.append(
            "rollout.cuda_graphs needs parallel.student.pp = 1 (the graphed decode step runs "
            "one pipeline stage): set it to false or use pp = 1"
        )
    return problems


def _exact_form_problems(cfg: EAOPDConfig) -> list[str]:
    """What the exact form (full teacher logits in the loss) needs: the teacher's logits shard on
    every rank must line up with the student's ([b, s, V_pad / tp] over the same TP group), so
    both models share one TP size and neither is pipelined ("exact mode for small pairs")."""
    problems = []
    s, t = cfg.parallel.student, cfg.parallel.teacher
    if t.tp != s.tp:
        problems.append(
            f"loss.form=exact needs parallel.teacher.tp == parallel.student.tp (got {t.tp} and "
            f"{s.tp}): the teacher's logits shard must match the student's vocabulary shard; set "
            f"parallel.teacher.tp={s.tp}, or use loss.form=sampled for other layouts"
        )
    if t.pp != 1 or t.vpp is not None:
        problems.append(
            "loss.form=exact needs parallel.teacher.pp=1 and parallel.teacher.vpp=null (the "
            "teacher runs a plain forward beside the student); use loss.form=sampled for a "
            "pipelined teacher"
        )
    return problems
