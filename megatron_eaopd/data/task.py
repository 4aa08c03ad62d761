"""The pluggable task interface and task loading.

A task supplies four things (docs/tasks.md):

- ``train_problems()``: prompts with reference solutions, for supervised teacher preparation;
- ``distill_problems()``: the prompts the student is distilled on;
- ``eval_sets()``: held-out evaluation prompts, by set name;
- ``check(response, problem)``: whether a response's final answer is right.

Configs name a task with ``task.name``: ``builtin`` (the synthetic arithmetic task), ``jsonl``
(prompt files, no code) or ``package.module:ClassName`` for any importable :class:`Task` subclass.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_eaopd.data.answers import check_answer, extract_boxed

__all__ = [
    "Problem",
    "Task",
    "TaskError",
    "import_task_class",
    "load_task",
    "validate_prompt_lengths",
]


class TaskError(ValueError):
    """A problem with a task's definition or its prompt files."""


@dataclass(frozen=True)
class Problem:
    """One prompt.

    Attributes:
        uid: stable identifier (unique within the task).
        prompt: the text the model continues.
        answer: the reference final answer (compared with the response's last ``\\boxed{}``).
        solutions: reference responses (for teacher preparation); may be empty.
        meta: free-form extra information.
    """

    uid: str
    prompt: str
    answer: str
    solutions: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Task(abc.ABC):
    """Base class of all tasks. Subclasses implement the four abstract methods.

    Responses are tokenised separately from prompts: a training sequence is
    ``encode(prompt) + encode(solution) + [eos]``, and a rollout continues ``encode(prompt)``.
    """

    #: short name used in logs and cache keys
    name: str = "task"
    #: strings a task-trained tokenizer keeps as single pieces (user-defined symbols)
    tokenizer_symbols: tuple[str, ...] = ()
    #: the default :meth:`check`'s use of math-verify (``eval.use_math_verify``, set by
    #: ``prepare_data``): True always, False never, None when it is installed
    use_math_verify: bool | None = None

    @abc.abstractmethod
    def train_problems(self) -> Sequence[Problem]:
        """Prompts with at least one reference solution each (teacher preparation)."""

    @abc.abstractmethod
    def distill_problems(self) -> Sequence[Problem]:
        """Prompts for on-policy distillation (reference solutions are not used)."""

    @abc.abstractmethod
    def eval_problems(self) -> Sequence[Problem]:
        """Held-out evaluation prompts (all eval sets together)."""

    def eval_sets(self) -> Mapping[str, Sequence[Problem]]:
        """Held-out prompts by evaluation-set name; default: one set named ``eval``."""
        return {"eval": self.eval_problems()}

    def check(self, response: str, problem: Problem) -> bool:
        """Whether ``response`` answers ``problem`` correctly (default: boxed-answer match,
        with math-verify as :attr:`use_math_verify` says)."""
        return check_answer(response, problem.answer, use_math_verify=self.use_math_verify)

    def explain(self, response: str, problem: Problem) -> str | None:
        """Why ``response`` is wrong, as a short ``"<kind>: <detail>"`` text, or None when
        :meth:`check` accepts it. Written beside each saved evaluation sample
        (``eval.save_samples``). The default reads the last ``\\boxed{}``: ``no answer`` (none),
        ``wrong answer`` (the default answer check, :func:`check_answer`, refuses it) or
        ``rejected`` (it accepts the answer, but this task's :meth:`check`, e.g. of the steps,
        fails). Override it to name the kind of mistake (the built-in countdown task names the
        first failed step check)."""
        if self.check(response, problem):
            return None
        boxed = extract_boxed(response)
        if boxed is None:
            return "no answer: no \\boxed{}"
        if not check_answer(response, problem.answer, use_math_verify=self.use_math_verify):
            return f"wrong answer: {boxed.strip()[:40]!r}, expected {str(problem.answer)[:40]!r}"
        return "rejected: the final answer matches but the check fails"

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 for a correct answer, else 0.0."""
        return 1.0 if self.check(response, problem) else 0.0

    def corpus(self) -> Iterator[str]:
        """Text to train a tokenizer on: training prompts and solutions, then all other prompts."""
        for p in self.train_problems():
            yield p.prompt
            yield from p.solutions
        for p in self.distill_problems():
            yield p.prompt
        for p in self.eval_problems():
            yield p.prompt

    def fingerprint(self) -> str:
        """A string that changes whenever the task's content changes (for cache keys)."""
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for text in self.corpus():
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()[:16]


def validate_prompt_lengths(
    problems: Sequence[Problem],
    encode: Callable[[str], Sequence[int]],
    max_tokens: int,
    what: str = "prompts",
) -> int:
    """Raise :class:`TaskError` naming the first prompt longer than ``max_tokens`` tokens.

    Also rejects an empty prompt set and a prompt that encodes to no token. Returns the longest
    prompt length found.
    """
    if len(problems) == 0:
        raise TaskError(f"the {what} set is empty")
    longest = 0
    too_long = []
    for p in problems:
        n = len(encode(p.prompt))
        if n == 0:  # a tokenizer without BOS can encode some text to nothing
            raise TaskError(
                f"{what}: {p.uid!r} encodes to no token with this tokenizer: drop it or give "
                "it text the tokenizer knows"
            )
        longest = max(longest, n)
        if n > max_tokens:
            too_long.append((p.uid, n))
    if too_long:
        uid, n = too_long[0]
        raise TaskError(
            f"{len(too_long)} of {len(problems)} {what} are longer than "
            f"rollout.max_prompt_tokens={max_tokens} tokens (first: {uid!r}, {n} tokens); "
            "raise the limit or drop those prompts"
        )
    return longest


def import_task_class(path: str) -> type:
    """Import ``package.module:ClassName`` and return the class.

    Raises:
        TaskError: malformed path, module not importable, no such attribute, or not a class.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task.name={path!r}: expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskError(f"task.name={path!r}: cannot import module {module_name!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"task.name={path!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not inspect.isclass(obj):
        raise TaskError(f"task.name={path!r}: {attr!r} is not a class")
    return obj


def load_task(task_cfg: Any) -> Task:
    """Build the task a :class:`~megatron_eaopd.config.TaskConfig` names.

    ``builtin`` gives the built-in task ``task.synthetic.kind`` names, built from
    ``task.synthetic``: :class:`~megatron_eaopd.data.countdown.CountdownTask` (``countdown``),
    :class:`~megatron_eaopd.data.sums.AnyOrderSumTask` (``sums``) or
    :class:`~megatron_eaopd.data.synthetic.SyntheticArithmeticTask` (``arith``); ``jsonl``
    gives :class:`~megatron_eaopd.data.jsonl.JsonlTask` from the file fields; ``module:Class``
    imports the class and builds it with ``Class.from_config(task_cfg)`` when it defines that
    classmethod, else ``Class(**task_cfg.options)``.
    """
    name = task_cfg.name
    if name == "builtin":
        from dataclasses import asdict

        settings = asdict(task_cfg.synthetic)
        kind = settings.pop("kind", "arith")
        if kind in ("countdown", "sums"):
            from megatron_eaopd.data.countdown import CountdownTask
            from megatron_eaopd.data.sums import AnyOrderSumTask

            settings.pop("product_prob")
            settings.pop("connectives")
            return (CountdownTask if kind == "countdown" else AnyOrderSumTask)(**settings)
        from megatron_eaopd.data.synthetic import SyntheticArithmeticTask

        return SyntheticArithmeticTask(**settings)
    if name == "jsonl":
        from megatron_eaopd.data.jsonl import JsonlTask

        return JsonlTask.from_config(task_cfg)
    cls = import_task_class(name)
    if hasattr(cls, "from_config"):
        task = cls.from_config(task_cfg)
    else:
        try:
            task = cls(**dict(task_cfg.options))
        except TypeError as err:
            raise TaskError(
                f"task.name={name!r}: cannot build it from task.options: {err}"
            ) from err
    missing = [
        m
        for m in ("train_problems", "distill_problems", "eval_problems", "check")
        if not callable(getattr(task, m, None))
    ]
    if missing:
        raise TaskError(f"task.name={name!r} is not a Task: it lacks {', '.join(missing)}")
    return task
