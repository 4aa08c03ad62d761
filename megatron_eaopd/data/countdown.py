"""The built-in CPU task: count a number down to 0 in allowed steps, any valid way.

A problem is a start number N (``task.synthetic.min_terms`` .. ``max_terms``, default 10-22) and a
set of allowed steps: 1 and two or three other sizes from 2 .. ``max_operand`` (default 9). A
solution subtracts allowed steps, one at a time, never going below 0, until it reaches 0::

    prompt:    down(17|1,3,5):
    solution:  -5=12;-3=9;-5=4;-3=1;-1=0;

Each step ``-s=r;`` may use ANY allowed step s no larger than what is left; ``r`` is what is left
after it. So a problem has many valid solutions (the compositions of N into allowed parts: 8 to
about a million, median ~400), and every step has a genuine branch point: the step size,
uniform over the allowed sizes that still fit under the task's solution policy (entropy ln 3 or
ln 4 nats with 3-4 allowed sizes, above tau = 0.8, until the last steps). Every other token (``-``,
``=``, what is left, ``;``) is determined by what came before. About 15% of the tokens of a
solution are branch points above 0.8 nats (:meth:`CountdownTask.oracle_entropies`).

Why this task (docs/tasks.md, docs/results.md): the state a model has to carry is the last
number it wrote (what is left) and the allowed sizes in the prompt; the arithmetic is a small
subtraction table (N - s with N <= 25, s <= 9); every number is one token. A 4-layer teacher learns
it in a few hundred supervised steps on CPU, and a briefly warm-started 2-layer student still
uses sizes that are not allowed, overshoots below 0 and slips in the subtraction: mistakes the
teacher's per-token signal points at directly. (The any-order sum task, ``kind: sums``, needs the
model to track which numbers of a list it has used; a 4-layer teacher trained for 800 steps still
failed most problems that way.)

Answers are judged by :func:`verify_countdown`: every step is parsed and checked (allowed size, not
below 0, the subtraction, ending at exactly 0), so any valid solution is accepted and nothing else.

The splits are a pure function of the settings: the eval set is drawn first, then the distillation
set, then the training set, each from its own seeded stream, skipping every (start, sizes) problem
already used, so the splits are disjoint.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_eaopd.data.task import Problem, Task, TaskError

__all__ = [
    "CountdownTask",
    "count_countdown_solutions",
    "countdown_error",
    "countdown_step_options",
    "enumerate_countdown_solutions",
    "sample_countdown_solution",
    "verify_countdown",
]

PROMPT = "down({start}|{steps}):"
_PROMPT_RE = re.compile(r"down\(([0-9]+)\|([0-9]+(?:,[0-9]+)*)\):")
_STEP_RE = re.compile(r"-([0-9]+)=([0-9]+)")
_WRITTEN_STEP_RE = re.compile(r"-([0-9]+)=(-?)([0-9]+)")  # also a result below zero, as written


def _number(text: str) -> int | None:
    """A canonical decimal (no sign, no leading zero), else None."""
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return None
    return int(text)


def countdown_step_options(left: int, steps: Sequence[int]) -> list[str]:
    """The valid next steps (texts, ``;`` included) with ``left`` remaining, in a fixed order."""
    return [f"-{s}={left - s};" for s in sorted(set(steps)) if s <= left]


@functools.lru_cache(maxsize=65536)
def _count(left: int, steps: tuple[int, ...]) -> int:
    if left == 0:
        return 1
    return sum(_count(left - s, steps) for s in steps if s <= left)


def count_countdown_solutions(start: int, steps: Sequence[int]) -> int:
    """Number of distinct valid solutions (compositions of ``start`` into allowed parts)."""
    return _count(start, tuple(sorted(set(steps))))


def enumerate_countdown_solutions(
    start: int, steps: Sequence[int], limit: int | None = None
) -> Iterator[str]:
    """Yield the distinct valid solutions (depth first, at most ``limit``)."""
    produced = 0

    def walk(left: int, prefix: str) -> Iterator[str]:
        if left == 0:
            yield prefix
            return
        for s in sorted(set(steps)):
            if s <= left:
                yield from walk(left - s, f"{prefix}-{s}={left - s};")

    for sol in walk(start, ""):
        yield sol
        produced += 1
        if limit is not None and produced >= limit:
            return


def sample_countdown_solution(start: int, steps: Sequence[int], rng: random.Random) -> str:
    """One valid solution, each step uniform over the allowed sizes that fit."""
    left, parts = start, []
    while left > 0:
        s = rng.choice([s for s in sorted(set(steps)) if s <= left])
        left -= s
        parts.append(f"-{s}={left};")
    return "".join(parts)


def countdown_error(start: int, steps: Sequence[int], text: str) -> str | None:
    """Why ``text`` is not a complete valid solution, or None when it is one.

    The reason names the first check that fails, reading the steps up to the last ``;``, as
    ``"<kind>: <detail>"`` with kind one of ``malformed`` (a step is not ``-s=r``), ``size not
    allowed``, ``below zero`` (a step larger than what is left, also written as ``-s=-r``),
    ``subtraction`` (``r`` is not what is left minus ``s``), ``not at zero`` (the steps stop
    early), ``unfinished`` (text after the last ``;`` before reaching 0, or no ``;`` at all) and
    ``text after the end`` (after reaching 0). Surrounding whitespace is ignored.
    """
    body = text.strip()
    head, sep, tail = body.rpartition(";")
    if not sep:
        return f"unfinished: no complete step in {body[:24]!r}"
    allowed, left = set(steps), start
    for step in head.split(";"):
        m = _WRITTEN_STEP_RE.fullmatch(step)
        s, sign, r = (_number(m[1]), m[2], _number(m[3])) if m else (None, "", None)
        if s is None or r is None:
            return f"malformed: {step[:24]!r}"
        if s not in allowed:
            return f"size not allowed: -{s} with {left} left (allowed {_sizes(allowed)})"
        if s > left:
            return f"below zero: -{s} with {left} left"
        if sign or left - s != r:
            return f"subtraction: {left}-{s} written as {sign}{r}"
        left = r
    if tail:
        kind = "text after the end" if left == 0 else "unfinished"
        return f"{kind}: {tail[:24]!r}"
    return None if left == 0 else f"not at zero: stops at {left}"


def _sizes(allowed: set[int]) -> str:
    return ",".join(str(s) for s in sorted(allowed))


def verify_countdown(start: int, steps: Sequence[int], text: str) -> bool:
    """Whether ``text`` is a complete valid solution: every step an allowed size no larger than
    what is left, every subtraction right, ending at exactly 0 (and nothing after it).
    Surrounding whitespace is ignored. :func:`countdown_error` says why not."""
    return countdown_error(start, steps, text) is None


def _stream(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"eaopd-countdown/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class CountdownTask(Task):
    """Count a number down to 0 in allowed steps (see the module docstring).

    Args mirror :class:`~megatron_eaopd.config.SyntheticTaskConfig`: ``min_terms`` /
    ``max_terms`` bound the start number, ``max_operand`` the step sizes.
    """

    name = "builtin-countdown"
    SYMBOLS = ("down", "(", ")", "|", ",", ":", "-", "=", ";")

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 500,
        num_distill: int = 400,
        num_eval: int = 64,
        min_terms: int = 10,
        max_terms: int = 22,
        max_operand: int = 9,
        solutions_per_problem: int = 8,
    ):
        if not 2 <= min_terms <= max_terms:
            raise TaskError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if max_operand < 4:
            raise TaskError(f"max_operand must be >= 4 (three step sizes), got {max_operand}")
        self.seed = seed
        self.min_start, self.max_start, self.max_step = min_terms, max_terms, max_operand
        self.solutions_per_problem = solutions_per_problem
        #: every number is one token, the same in the prompt and in the response
        self.tokenizer_symbols = (*self.SYMBOLS, *(str(i) for i in range(max_terms, -1, -1)))
        self.settings = dict(
            seed=seed,
            num_train=num_train,
            num_distill=num_distill,
            num_eval=num_eval,
            min_terms=min_terms,
            max_terms=max_terms,
            max_operand=max_operand,
            solutions_per_problem=solutions_per_problem,
        )
        seen: set[tuple] = set()
        self._eval = self._make_split("eval", num_eval, seen, with_solutions=False)
        self._distill = self._make_split("distill", num_distill, seen, with_solutions=False)
        self._train = self._make_split("train", num_train, seen, with_solutions=True)

    def _make_split(self, split: str, n: int, seen: set, with_solutions: bool) -> list[Problem]:
        """``n`` problems not in ``seen`` (which they are added to)."""
        rng = _stream(self.seed, split)
        problems: list[Problem] = []
        misses = 0
        while len(problems) < n:
            start = rng.randint(self.min_start, self.max_start)
            others = rng.sample(range(2, self.max_step + 1), rng.choice((2, 3)))
            steps = tuple(sorted((1, *others)))
            key = (start, steps)
            if key in seen:
                misses += 1
                if misses > 50 * n + 1000:
                    raise TaskError(
                        f"cannot draw {n} distinct {split} problems with these settings; lower "
                        "task.synthetic.num_* or widen min_terms..max_terms / max_operand"
                    )
                continue
            seen.add(key)
            sols: tuple[str, ...] = ()
            if with_solutions:
                want = min(self.solutions_per_problem, count_countdown_solutions(start, steps))
                found: dict[str, None] = {}
                for _ in range(32 * want):
                    found[sample_countdown_solution(start, steps, rng)] = None
                    if len(found) >= want:
                        break
                sols = tuple(found)
            problems.append(
                Problem(
                    uid=f"countdown-{split}-{len(problems)}",
                    prompt=PROMPT.format(start=start, steps=",".join(map(str, steps))),
                    answer="0",
                    solutions=sols,
                    meta={"start": start, "steps": steps},
                )
            )
        return problems

    @staticmethod
    def problem_of(problem: Problem) -> tuple[int, tuple[int, ...]]:
        """``(start, allowed step sizes)`` of a problem (metadata, else parsed from the prompt)."""
        if "start" in problem.meta:
            return int(problem.meta["start"]), tuple(problem.meta["steps"])
        m = _PROMPT_RE.fullmatch(problem.prompt)
        if m is None:
            raise ValueError(f"not a prompt of this task: {problem.prompt!r}")
        return int(m.group(1)), tuple(int(x) for x in m.group(2).split(","))

    def train_problems(self) -> Sequence[Problem]:
        """Training problems, each with up to ``solutions_per_problem`` distinct solutions."""
        return self._train

    def distill_problems(self) -> Sequence[Problem]:
        """Distillation prompts."""
        return self._distill

    def eval_problems(self) -> Sequence[Problem]:
        """Held-out prompts."""
        return self._eval

    def check(self, response: str, problem: Problem) -> bool:
        """The verifier: every step allowed, every subtraction right, ending at exactly 0."""
        return verify_countdown(*self.problem_of(problem), response)

    def explain(self, response: str, problem: Problem) -> str | None:
        """The first failed check of :func:`countdown_error`, or None for a valid solution."""
        return countdown_error(*self.problem_of(problem), response)

    def check_reasoning(self, response: str, problem: Problem) -> bool:
        """Same as :meth:`check` (the verifier checks every step)."""
        return self.check(response, problem)

    def num_solutions(self, problem: Problem) -> int:
        """Number of distinct valid solutions of ``problem``."""
        return count_countdown_solutions(*self.problem_of(problem))

    def solutions(self, problem: Problem, limit: int | None = None) -> list[str]:
        """The distinct valid solutions of ``problem`` (at most ``limit``)."""
        return list(enumerate_countdown_solutions(*self.problem_of(problem), limit))

    def oracle_entropies(self, problem: Problem, solution: str, tokenizer: Any) -> list[float]:
        """Per-token entropy (nats) of the task's solution policy along ``solution``.

        The policy the reference solutions are drawn from: each step uniform over the allowed
        sizes that fit. One value per token of ``encode(solution)`` plus one for the EOS (0).
        """
        left, steps = self.problem_of(problem)
        out: list[float] = []
        rest = solution
        while left > 0:
            options = countdown_step_options(left, steps)
            step = next((o for o in options if rest.startswith(o)), None)
            if step is None:
                raise ValueError(f"not a valid step here: {rest!r}")
            encoded = [tokenizer.encode(o) for o in options]
            chosen = tokenizer.encode(step)
            for j in range(len(chosen)):
                counts = Counter(o[j] for o in encoded if len(o) > j and o[:j] == chosen[:j])
                n = sum(counts.values())
                out.append(-sum(c / n * math.log(c / n) for c in counts.values()))
            rest = rest[len(step) :]
            left = int(_STEP_RE.fullmatch(step[:-1]).group(2))
        if rest:
            raise ValueError(f"text after the last step: {rest!r}")
        return out + [0.0]

    def fingerprint(self) -> str:
        """Hash of the settings (the splits are a pure function of them) and the format."""
        text = repr(sorted(self.settings.items())) + PROMPT + "v1"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
