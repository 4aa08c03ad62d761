"""The built-in synthetic reasoning task: step-by-step evaluation of small arithmetic expressions.

A problem is a sum of 3-4 terms, each a number or a product, e.g. ``3*4+5+2*6``. A solution
rewrites the expression one step at a time and ends with the boxed value::

    prompt:   Compute 3*4+5+2*6 step by step:
    solution: 3*4=12>12+5+2*6;2*6=12>12+5+12;12+12=24>24+5;24+5=29>29;\\boxed{29}

Each step is ``<operation>=<value>><expression after the step>;``. A step may evaluate ANY
remaining product, or add ANY two plain numbers (in either order); the sum takes the place of the
left-most of the two and the other is removed. So a problem has many valid solutions: the first
token of a step (which operation to do next) is a genuine branch point where a teacher trained on
uniformly chosen valid paths is uncertain, while the rest of the step (the arithmetic and the
rewritten expression) is determined and the teacher is certain.

The splits are a pure function of the settings: the eval set is drawn first, then the distillation
set, then the training set, each from its own seeded stream, skipping every expression already used
(up to reordering of terms and factors), so the splits are disjoint and the eval set does not change
when ``num_train`` or ``num_distill`` change.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator, Sequence

from megatron_eaopd.data.answers import extract_boxed
from megatron_eaopd.data.task import Problem, Task, TaskError

__all__ = [
    "SyntheticArithmeticTask",
    "count_solutions",
    "enumerate_solutions",
    "next_steps",
    "parse_expression",
    "render",
    "sample_solution",
    "verify_solution",
]

# A term is ("n", value) or ("m", a, b) for the product a*b; a state is a tuple of terms.
Term = tuple
State = tuple


def render(state: State) -> str:
    """The expression text of a state, e.g. ``12+5+2*6``."""
    return "+".join(str(t[1]) if t[0] == "n" else f"{t[1]}*{t[2]}" for t in state)


def parse_expression(text: str) -> State:
    """Inverse of :func:`render` (positive integers, ``+`` and ``*`` with two factors)."""
    terms = []
    for part in text.split("+"):
        factors = part.split("*")
        if not all(f.isdigit() for f in factors) or len(factors) > 2:
            raise ValueError(f"not an expression of this task: {text!r}")
        terms.append(("n", int(factors[0])) if len(factors) == 1 else ("m", *map(int, factors)))
    return tuple(terms)


def value_of(state: State) -> int:
    """The value of an expression."""
    return sum(t[1] if t[0] == "n" else t[1] * t[2] for t in state)


@functools.lru_cache(maxsize=65536)
def next_steps(state: State) -> tuple[tuple[str, State], ...]:
    """All distinct valid steps from ``state`` as ``(step_text, next_state)``, in a fixed order.

    ``step_text`` is ``<operation>=<value>><next expression>``; steps that would print the same
    text and lead to the same state (adding two equal numbers in either order) count once.
    """
    out: dict[tuple[str, State], None] = {}
    for i, t in enumerate(state):
        if t[0] == "m":
            nxt = (*state[:i], ("n", t[1] * t[2]), *state[i + 1 :])
            out[(f"{t[1]}*{t[2]}={t[1] * t[2]}>{render(nxt)}", nxt)] = None
    nums = [i for i, t in enumerate(state) if t[0] == "n"]
    for i in nums:
        for j in nums:
            if i == j:
                continue
            lo, hi = min(i, j), max(i, j)
            total = state[i][1] + state[j][1]
            nxt = tuple(("n", total) if k == lo else t for k, t in enumerate(state) if k != hi)
            out[(f"{state[i][1]}+{state[j][1]}={total}>{render(nxt)}", nxt)] = None
    return tuple(out)


def _is_final(state: State) -> bool:
    return len(state) == 1 and state[0][0] == "n"


@functools.lru_cache(maxsize=65536)
def count_solutions(state: State) -> int:
    """Number of distinct valid solutions (paths to a single number) from ``state``."""
    if _is_final(state):
        return 1
    return sum(count_solutions(nxt) for _, nxt in next_steps(state))


def enumerate_solutions(state: State, limit: int | None = None) -> Iterator[str]:
    """Yield the distinct valid solution texts of ``state`` (depth first, at most ``limit``)."""
    answer = value_of(state)
    produced = 0

    def walk(s: State, prefix: str) -> Iterator[str]:
        if _is_final(s):
            yield f"{prefix}\\boxed{{{answer}}}"
            return
        for text, nxt in next_steps(s):
            yield from walk(nxt, f"{prefix}{text};")

    for sol in walk(state, ""):
        yield sol
        produced += 1
        if limit is not None and produced >= limit:
            return


def sample_solution(state: State, rng: random.Random) -> str:
    """One valid solution, choosing each step uniformly among the valid steps."""
    parts = []
    answer = value_of(state)
    while not _is_final(state):
        text, state = rng.choice(next_steps(state))
        parts.append(text + ";")
    return "".join(parts) + f"\\boxed{{{answer}}}"


def verify_solution(state: State, text: str) -> bool:
    """Whether ``text`` is a complete valid solution of ``state`` (every step and the answer)."""
    *steps, last = text.strip().split(";")
    for step in steps:
        options = dict(next_steps(state))
        if step not in options:
            return False
        state = options[step]
    boxed = extract_boxed(last)
    return _is_final(state) and boxed is not None and boxed == str(state[0][1])


def _canonical(state: State) -> tuple:
    return tuple(sorted((t[0], *sorted(t[1:])) for t in state))


def _stream(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"eaopd-arith/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class SyntheticArithmeticTask(Task):
    """Step-by-step arithmetic with several valid solution orders (see the module docstring).

    Args mirror :class:`~megatron_eaopd.config.SyntheticTaskConfig`.
    """

    name = "builtin-arith"
    PROMPT = "Compute {expr} step by step:"
    #: kept as whole single pieces by the task tokenizer, so that numbers never merge with
    #: operators and the first token of a step is exactly the choice of the next operation
    tokenizer_symbols = ("+", "*", "=", ">", ";", ":", "\\boxed{", "}")

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 4000,
        num_distill: int = 1024,
        num_eval: int = 128,
        min_terms: int = 3,
        max_terms: int = 4,
        max_operand: int = 9,
        product_prob: float = 0.4,
        solutions_per_problem: int = 4,
    ):
        if not 2 <= min_terms <= max_terms:
            raise TaskError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if max_operand < 2:
            raise TaskError(f"max_operand must be >= 2, got {max_operand}")
        self.seed = seed
        self.min_terms, self.max_terms = min_terms, max_terms
        self.max_operand, self.product_prob = max_operand, product_prob
        self.solutions_per_problem = solutions_per_problem
        self.settings = dict(
            seed=seed,
            num_train=num_train,
            num_distill=num_distill,
            num_eval=num_eval,
            min_terms=min_terms,
            max_terms=max_terms,
            max_operand=max_operand,
            product_prob=product_prob,
            solutions_per_problem=solutions_per_problem,
        )
        seen: set[tuple] = set()
        self._eval = self._make_split("eval", num_eval, seen, with_solutions=False)
        self._distill = self._make_split("distill", num_distill, seen, with_solutions=False)
        self._train = self._make_split("train", num_train, seen, with_solutions=True)

    def _random_state(self, rng: random.Random) -> State:
        terms = []
        for _ in range(rng.randint(self.min_terms, self.max_terms)):
            if rng.random() < self.product_prob:
                terms.append(
                    ("m", rng.randint(2, self.max_operand), rng.randint(2, self.max_operand))
                )
            else:
                terms.append(("n", rng.randint(1, self.max_operand)))
        return tuple(terms)

    def _make_split(self, split: str, n: int, seen: set, with_solutions: bool) -> list[Problem]:
        rng = _stream(self.seed, split)
        problems: list[Problem] = []
        misses = 0
        while len(problems) < n:
            state = self._random_state(rng)
            key = _canonical(state)
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
                want = min(self.solutions_per_problem, count_solutions(state))
                found: dict[str, None] = {}
                for _ in range(8 * want):
                    found[sample_solution(state, rng)] = None
                    if len(found) >= want:
                        break
                sols = tuple(found)
            expr = render(state)
            problems.append(
                Problem(
                    uid=f"arith-{split}-{len(problems)}",
                    prompt=self.PROMPT.format(expr=expr),
                    answer=str(value_of(state)),
                    solutions=sols,
                    meta={"expression": expr},
                )
            )
        return problems

    @staticmethod
    def state_of(problem: Problem) -> State:
        """The expression of a problem of this task."""
        return parse_expression(problem.meta["expression"])

    def train_problems(self) -> Sequence[Problem]:
        """Training problems, each with up to ``solutions_per_problem`` distinct valid paths."""
        return self._train

    def distill_problems(self) -> Sequence[Problem]:
        """Distillation prompts."""
        return self._distill

    def eval_problems(self) -> Sequence[Problem]:
        """Held-out prompts."""
        return self._eval

    def check(self, response: str, problem: Problem) -> bool:
        """Whether the last boxed answer equals the expression's value (outcome check)."""
        boxed = extract_boxed(response)
        return boxed is not None and boxed.strip() == problem.answer

    def check_reasoning(self, response: str, problem: Problem) -> bool:
        """Whether ``response`` is a complete valid solution path (every step checked)."""
        return verify_solution(self.state_of(problem), response)

    def num_solutions(self, problem: Problem) -> int:
        """Number of distinct valid solutions of ``problem``."""
        return count_solutions(self.state_of(problem))

    def solutions(self, problem: Problem, limit: int | None = None) -> list[str]:
        """The distinct valid solutions of ``problem`` (at most ``limit``)."""
        return list(enumerate_solutions(self.state_of(problem), limit))

    def fingerprint(self) -> str:
        """Hash of the settings (the splits are a pure function of them) and the format."""
        text = repr(sorted(self.settings.items())) + self.PROMPT + "v1"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
