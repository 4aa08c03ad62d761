"""The built-in CPU task: add a list of small numbers, two or one at a time, in any order.

A problem is a list of 4-5 distinct numbers (``task.synthetic.min_terms`` .. ``max_terms``, each
in 1 .. ``max_operand``); a solution adds them up with a running total and boxes it::

    prompt:    sum(3,7,5,2):
    solution:  5+3=8;+2=10;+7=17;\\boxed{17}

The first step adds ANY two of the numbers, in either order; every later step adds ANY number not
used yet; the numbers used must be exactly the list (as a multiset). So a problem of n distinct
numbers has n! valid solutions, and every solution has genuine branch points: the first two
numbers (entropy ln n and ln(n - 1) under the uniform solution policy) and the number of each later
step (ln(n - 2), ...). Every other token (``+``, ``=``, the running total, ``;``, the box) is
determined by what came before. With 4-5 numbers 10-12% of the tokens of a solution are branch
points above 0.8 nats (:meth:`AnyOrderSumTask.oracle_entropies`).

The numbers of a problem are distinct: with repeats allowed (``sum(8,7,6,6,9):``) a 4-layer
teacher trained for 800 steps failed 62% of its samples by using a number the wrong number of
times (``8+8=16;+8=24;+6=30;+6=36``: the right total from the wrong numbers), since tracking
counts is much harder for a small model than tracking which numbers were used. The verifier and
the solution functions still accept multisets.

Why this task (docs/tasks.md, docs/results.md): its solutions are 20-25 tokens, every number is one
token, the arithmetic is a small addition table (totals up to ``max_terms * max_operand``), and the
only state a model has to track is which numbers are used. A 4-layer teacher learns it to > 0.9
Avg@8 in about a thousand supervised steps on CPU, while a briefly warm-started 2-layer student
still repeats or forgets numbers and slips in the totals: mistakes the teacher's per-token signal
points at directly.

Answers are judged by :func:`verify_sum_solution`: every step is parsed and checked (the numbers
used, each running total, the boxed value), so any of the n! solutions is accepted and a right
boxed total reached by wrong steps is rejected.

The splits are a pure function of the settings: the eval set is drawn first, then the distillation
set, then the training set, each from its own seeded stream, skipping every multiset of numbers
already used, so no evaluation list appears (in any order) among the training or distillation
lists.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_eaopd.data.task import Problem, Task, TaskError

__all__ = [
    "AnyOrderSumTask",
    "count_sum_solutions",
    "enumerate_sum_solutions",
    "sample_sum_solution",
    "sum_step_options",
    "verify_sum_solution",
]

PROMPT = "sum({numbers}):"
_PROMPT_RE = re.compile(r"sum\(([0-9]+(?:,[0-9]+)*)\):")
_FIRST_RE = re.compile(r"([0-9]+)\+([0-9]+)=([0-9]+)")
_NEXT_RE = re.compile(r"\+([0-9]+)=([0-9]+)")
_BOX_RE = re.compile(r"\\boxed\{([0-9]+)\}")


def _number(text: str) -> int | None:
    """A canonical decimal (no sign, no leading zero), else None."""
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return None
    return int(text)


def sum_step_options(remaining: Sequence[int], total: int | None) -> list[str]:
    """The distinct valid next steps (texts, ``;`` included) from a state, in a fixed order.

    ``remaining``: the numbers not used yet (a multiset); ``total``: the running total, None
    before the first step. The first step is ``a+b=s;`` for any ordered pair of the numbers, a
    later step ``+c=t;``, and with nothing left the last is ``\\boxed{t}``.
    """
    values = sorted(set(remaining))
    if total is None:
        count = Counter(remaining)
        return [f"{a}+{b}={a + b};" for a in values for b in values if a != b or count[a] >= 2]
    if not remaining:
        return [f"\\boxed{{{total}}}"]
    return [f"+{c}={total + c};" for c in values]


def _apply(remaining: Counter, total: int | None, step: str) -> tuple[Counter, int | None]:
    """The state after a valid ``step`` (as returned by :func:`sum_step_options`)."""
    left = Counter(remaining)
    if total is None:
        a, b, s = map(int, _FIRST_RE.fullmatch(step[:-1]).groups())
        left[a] -= 1
        left[b] -= 1
        return +left, s
    c, t = map(int, _NEXT_RE.fullmatch(step[:-1]).groups())
    left[c] -= 1
    return +left, t


def count_sum_solutions(numbers: Sequence[int]) -> int:
    """Number of distinct valid solutions: the distinct orderings of the multiset."""
    count = math.factorial(len(numbers))
    for c in Counter(numbers).values():
        count //= math.factorial(c)
    return count


def enumerate_sum_solutions(numbers: Sequence[int], limit: int | None = None) -> Iterator[str]:
    """Yield the distinct valid solutions (depth first, at most ``limit``)."""
    produced = 0

    def walk(left: Counter, total: int | None, prefix: str) -> Iterator[str]:
        for step in sum_step_options(list(left.elements()), total):
            if step.startswith("\\boxed"):
                yield prefix + step
            else:
                yield from walk(*_apply(left, total, step), prefix + step)

    for sol in walk(Counter(numbers), None, ""):
        yield sol
        produced += 1
        if limit is not None and produced >= limit:
            return


def sample_sum_solution(numbers: Sequence[int], rng: random.Random) -> str:
    """One valid solution, each choice uniform over the distinct remaining values."""
    left, total, parts = Counter(numbers), None, []
    while True:
        step = rng.choice(sum_step_options(list(left.elements()), total))
        parts.append(step)
        if step.startswith("\\boxed"):
            return "".join(parts)
        left, total = _apply(left, total, step)


def verify_sum_solution(numbers: Sequence[int], text: str) -> bool:
    """Whether ``text`` is a complete valid solution for ``numbers``.

    Checks the format, that the numbers used are exactly ``numbers`` (as a multiset, each once),
    every running total, and that the boxed value is the final total (= the sum). Surrounding
    whitespace is ignored; anything else (text after the box, a missing box) is wrong.
    """
    *steps, last = text.strip().split(";")
    if not steps:
        return False
    first = _FIRST_RE.fullmatch(steps[0])
    if first is None:
        return False
    a, b, s = (_number(g) for g in first.groups())
    if None in (a, b, s) or a + b != s:
        return False
    used, total = [a, b], s
    for step in steps[1:]:
        m = _NEXT_RE.fullmatch(step)
        if m is None:
            return False
        c, t = (_number(g) for g in m.groups())
        if None in (c, t) or total + c != t:
            return False
        used.append(c)
        total = t
    box = _BOX_RE.fullmatch(last)
    if box is None or _number(box.group(1)) != total:
        return False
    return Counter(used) == Counter(numbers)


def _stream(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"eaopd-sums/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class AnyOrderSumTask(Task):
    """Add a list of numbers in any order (see the module docstring).

    Args mirror :class:`~megatron_eaopd.config.SyntheticTaskConfig` (``min_terms`` /
    ``max_terms``: how many numbers, ``max_operand``: the largest number).
    """

    name = "builtin-sums"
    SYMBOLS = ("sum", "(", ")", ",", ":", "+", "=", ";", "\\boxed{", "}")

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 1000,
        num_distill: int = 512,
        num_eval: int = 64,
        min_terms: int = 4,
        max_terms: int = 5,
        max_operand: int = 13,
        solutions_per_problem: int = 4,
    ):
        if not 2 <= min_terms <= max_terms:
            raise TaskError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if max_operand < max_terms:
            raise TaskError(
                f"max_operand={max_operand} must be >= max_terms={max_terms} (distinct numbers)"
            )
        self.seed = seed
        self.min_terms, self.max_terms, self.max_operand = min_terms, max_terms, max_operand
        self.solutions_per_problem = solutions_per_problem
        #: every number (operands and totals) is one token of the task tokenizer, the same token
        #: in the prompt and in the response; operators never merge with numbers
        self.tokenizer_symbols = (
            *self.SYMBOLS,
            *(str(i) for i in range(max_terms * max_operand, -1, -1)),
        )
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
        seen: set[tuple[int, ...]] = set()
        self._eval = self._make_split("eval", num_eval, seen, with_solutions=False)
        self._distill = self._make_split("distill", num_distill, seen, with_solutions=False)
        self._train = self._make_split("train", num_train, seen, with_solutions=True)

    def _make_split(self, split: str, n: int, seen: set, with_solutions: bool) -> list[Problem]:
        """``n`` problems whose number sets are not in ``seen`` (which they are added to)."""
        rng = _stream(self.seed, split)
        problems: list[Problem] = []
        misses = 0
        while len(problems) < n:
            size = rng.randint(self.min_terms, self.max_terms)
            numbers = rng.sample(range(1, self.max_operand + 1), size)
            key = tuple(sorted(numbers))
            if key in seen:
                misses += 1
                if misses > 50 * n + 1000:
                    raise TaskError(
                        f"cannot draw {n} distinct {split} problems with these settings; lower "
                        "task.synthetic.num_* or raise max_terms / max_operand"
                    )
                continue
            seen.add(key)
            sols: tuple[str, ...] = ()
            if with_solutions:
                want = min(self.solutions_per_problem, count_sum_solutions(numbers))
                found: dict[str, None] = {}
                for _ in range(8 * want):
                    found[sample_sum_solution(numbers, rng)] = None
                    if len(found) >= want:
                        break
                sols = tuple(found)
            text = ",".join(map(str, numbers))
            problems.append(
                Problem(
                    uid=f"sums-{split}-{len(problems)}",
                    prompt=PROMPT.format(numbers=text),
                    answer=str(sum(numbers)),
                    solutions=sols,
                    meta={"numbers": tuple(numbers)},
                )
            )
        return problems

    @staticmethod
    def numbers_of(problem: Problem) -> tuple[int, ...]:
        """The numbers of a problem (from its metadata, else parsed from the prompt)."""
        if "numbers" in problem.meta:
            return tuple(problem.meta["numbers"])
        m = _PROMPT_RE.fullmatch(problem.prompt)
        if m is None:
            raise ValueError(f"not a prompt of this task: {problem.prompt!r}")
        return tuple(int(x) for x in m.group(1).split(","))

    def train_problems(self) -> Sequence[Problem]:
        """Training problems, each with up to ``solutions_per_problem`` distinct valid orders."""
        return self._train

    def distill_problems(self) -> Sequence[Problem]:
        """Distillation prompts."""
        return self._distill

    def eval_problems(self) -> Sequence[Problem]:
        """Held-out prompts (their number multisets appear in no other split)."""
        return self._eval

    def check(self, response: str, problem: Problem) -> bool:
        """The verifier: every step, the numbers used and the boxed total (any valid order)."""
        return verify_sum_solution(self.numbers_of(problem), response)

    def check_reasoning(self, response: str, problem: Problem) -> bool:
        """Same as :meth:`check` (the verifier checks every step)."""
        return self.check(response, problem)

    def num_solutions(self, problem: Problem) -> int:
        """Number of distinct valid solutions of ``problem``."""
        return count_sum_solutions(self.numbers_of(problem))

    def solutions(self, problem: Problem, limit: int | None = None) -> list[str]:
        """The distinct valid solutions of ``problem`` (at most ``limit``)."""
        return list(enumerate_sum_solutions(self.numbers_of(problem), limit))

    def oracle_entropies(self, problem: Problem, solution: str, tokenizer: Any) -> list[float]:
        """Per-token entropy (nats) of the task's solution policy along ``solution``.

        The policy the reference solutions are drawn from: each step uniform over the valid
        ones. One value per token of ``encode(solution)`` plus one for the EOS (0). The branch
        points (the numbers chosen) carry the entropy; every other token has 0.
        """
        left: Counter = Counter(self.numbers_of(problem))
        total: int | None = None
        out: list[float] = []
        rest = solution
        while True:
            options = sum_step_options(list(left.elements()), total)
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
            if step.startswith("\\boxed"):
                return out + [0.0]
            left, total = _apply(left, total, step)

    def fingerprint(self) -> str:
        """Hash of the settings (the splits are a pure function of them) and the format."""
        text = repr(sorted(self.settings.items())) + PROMPT + "v1"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
