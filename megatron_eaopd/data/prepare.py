"""One call that turns a config into checked data: task, tokenizer, prompt sets.

:func:`prepare_data` runs every data check that can fail before any model is built: the task loads
(prompt files exist and parse), math-verify is installed when ``eval.use_math_verify`` asks for it
(the task's answer checking follows that key), the tokenizer builds, no prompt set is empty, every
prompt fits ``rollout.max_prompt_tokens``, and (when the teacher is prepared on the task) every
training example fits the teacher's ``max_seq_len``. Each failure is a :class:`TaskError` with the
fix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_eaopd.data.answers import math_verify_available
from megatron_eaopd.data.sequences import (
    build_sft_example,
    encode_prompt,
    stop_token_ids,
    use_chat_template,
)
from megatron_eaopd.data.task import Problem, Task, TaskError, load_task, validate_prompt_lengths
from megatron_eaopd.data.tokenizer import build_tokenizer

__all__ = ["PreparedData", "evaluated_problems", "prepare_data", "tokenizer_vocab_size"]


@dataclass
class PreparedData:
    """The checked data of a run."""

    task: Task
    """The loaded task."""
    tokenizer: Any
    """The tokenizer (the project's sentencepiece Tokenizer or a Hugging Face one)."""
    vocab_size: int
    """The tokenizer's vocabulary size (fill ``model.*.vocab_size: 0`` with it)."""
    distill: Sequence[Problem]
    """Distillation prompts."""
    eval_sets: Mapping[str, Sequence[Problem]]
    """Held-out prompts by set name (may be empty)."""
    longest_prompt: int
    """Tokens of the longest prompt (with BOS) over all sets."""


def evaluated_problems(problems: Sequence[Problem], max_prompts: int | None) -> list[Problem]:
    """The problems of one evaluation set that evaluations use: the first ``eval.max_prompts``
    (all with 0 or None). The data checks validate exactly these."""
    return list(problems)[:max_prompts] if max_prompts else list(problems)


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Vocabulary size of the project's Tokenizer or a Hugging Face tokenizer (``len``)."""
    size = getattr(tokenizer, "vocab_size", None)
    if hasattr(tokenizer, "sp") and size is not None:
        return int(size)
    return len(tokenizer)


def _load_error(tok: Any, err: Exception) -> TaskError:
    """The refusal of a ``tokenizer.path`` that does not load as ``tokenizer.kind``."""
    return TaskError(
        f"tokenizer.path={tok.path!r}: the {tok.kind} tokenizer does not load "
        f"({type(err).__name__}: {err}); point tokenizer.path at a "
        f"{'.model file' if tok.kind == 'sentencepiece' else 'tokenizer folder or hub name'}"
    )


def prepare_data(cfg: Any, check_teacher_examples: bool | None = None) -> PreparedData:
    """Load and check the task and tokenizer of ``cfg`` (an ``EAOPDConfig``).

    Args:
        cfg: the validated config.
        check_teacher_examples: check that all training examples fit the teacher's context;
            None: when the teacher will be prepared on the task (no teacher checkpoint).

    Raises:
        TaskError: a tokenizer file or folder that does not load, a missing/malformed prompt
            file, eval.use_math_verify=true without math-verify
            installed, an empty prompt set, fewer distillation prompts than
            ``rollout.prompts_per_iteration``, a prompt longer than
            ``rollout.max_prompt_tokens`` (of each evaluation set, only the first
            ``eval.max_prompts``, which evaluations use), a training example longer than the
            teacher's context.
    """
    task = load_task(cfg.task)
    use_mv = cfg.eval.use_math_verify
    if use_mv and not math_verify_available():
        raise TaskError(
            "eval.use_math_verify=true needs the math-verify package, which is not installed: "
            "`pip install math-verify`, or set eval.use_math_verify=null or false"
        )
    task.use_math_verify = use_mv
    tok = cfg.tokenizer
    try:
        tokenizer = build_tokenizer(tok, task)
    except RuntimeError as err:  # sentencepiece's own words: training or loading a model
        need = re.search(r"required_chars\. \d+ vs (\d+)", str(err))
        if tok.kind != "task":  # not a sentencepiece model (a tokenizer.json, a text file)
            raise _load_error(tok, err) from err
        if not need:
            raise
        raise TaskError(
            f"tokenizer.vocab_size={tok.vocab_size} is below the {need.group(1)} pieces the "
            "task tokenizer needs (every distinct character of the task's text, plus its "
            f"special tokens): set tokenizer.vocab_size to at least {need.group(1)}, or use a "
            "pretrained tokenizer (tokenizer.kind / tokenizer.path)"
        ) from err
    except (OSError, ValueError, ImportError) as err:
        if tok.kind == "task":  # training the task tokenizer: not a path problem
            raise
        raise _load_error(tok, err) from err
    if getattr(cfg.tokenizer, "chat_template", False):
        use_chat_template(tokenizer, cfg.tokenizer.enable_thinking)
    try:
        stops = stop_token_ids(tokenizer)  # responses must end: before any model is loaded
    except ValueError as err:
        raise TaskError(f"tokenizer.path={tok.path!r}: {err}") from err
    logging.getLogger(__name__).info("responses end at the token ids %s", stops)

    def encode(text: str) -> list[int]:
        return encode_prompt(tokenizer, text)

    limit = cfg.rollout.max_prompt_tokens
    distill = task.distill_problems()
    longest = validate_prompt_lengths(distill, encode, limit, "distillation prompts")
    eval_sets = dict(task.eval_sets())
    if not eval_sets:
        logging.getLogger(__name__).warning(
            "the task has no evaluation sets (task.eval_files is empty): evaluations will "
            "measure nothing; add held-out prompt files to task.eval_files"
        )
    used = getattr(cfg.eval, "max_prompts", None)
    for name, problems in eval_sets.items():
        problems = evaluated_problems(problems, used)
        longest = max(
            longest, validate_prompt_lengths(problems, encode, limit, f"'{name}' prompts")
        )
    if len(distill) < cfg.rollout.prompts_per_iteration:
        raise TaskError(
            f"rollout.prompts_per_iteration={cfg.rollout.prompts_per_iteration} exceeds the "
            f"{len(distill)} distillation prompts of the task: lower it (and "
            "rollout.mini_batch_size with it) or give more prompts"
        )
    if check_teacher_examples is None:
        check_teacher_examples = (
            cfg.model.teacher_checkpoint is None
            and not getattr(cfg.model, "teacher_hf", None)
            and cfg.teacher_prep.enabled
        )
    if check_teacher_examples:
        train = task.train_problems()
        if len(train) == 0:
            raise TaskError(
                "teacher preparation needs training problems, the task has none: raise "
                "task.synthetic.num_train (built-in tasks) or give task.train_file (jsonl), or "
                "load a teacher (model.teacher_hf / model.teacher_checkpoint)"
            )
        max_len = cfg.model.teacher.max_seq_len
        for p in train:
            if not p.solutions:
                raise TaskError(f"training problem {p.uid!r} has no reference solution")
            for sol in p.solutions:
                try:
                    build_sft_example(tokenizer, p.prompt, sol, max_len)
                except ValueError as err:
                    raise TaskError(
                        f"training problem {p.uid!r}: {err}; raise model.teacher.max_seq_len"
                    ) from err
    return PreparedData(
        task=task,
        tokenizer=tokenizer,
        vocab_size=tokenizer_vocab_size(tokenizer),
        distill=distill,
        eval_sets=eval_sets,
        longest_prompt=longest,
    )
