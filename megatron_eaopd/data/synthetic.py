"""The built-in synthetic reasoning task: step-by-step evaluation of small arithmetic expressions.

A problem is a sum of 3-4 terms, each a number or a product, e.g. ``3*4+5+2*6``. A solution
rewrites the expression one step at a time and ends with the boxed value::

    prompt:   Compute 3*4+5+2*6 step by step:
    solution: so3*4=12>12+5+2*6;then2*6=12>12+5+12;now12+12=24>24+5;so24+5=29>29;\\boxed{29}

Each step is ``<connective><operation>=<value>><expression after the step>;``. A step may
evaluate ANY remaining product, or add ANY two plain numbers (in either order); the sum takes the
place of the left-most of the two and the other is removed; and it may start with any of the
connective words. So a problem has many valid solutions: the first tokens of a step (connective,
which operation) are genuine branch points where a teacher trained on uniformly chosen valid paths
is uncertain, while the rest of the step (the arithmetic and the rewritten expression) is
determined and the teacher is certain (:meth:`SyntheticArithmeticTask.oracle_entropies`).

The splits are a pure function of the settings: the eval set is drawn first, then the distillation
set, then the training set, each from its own seeded stream, skipping every expression already used
(up to reordering of terms and factors), so the splits are disjoint and the eval set does not change
when ``num_train`` or ``num_distill`` change.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_eaopd.data.answers import extract_boxed
from megatron_eaopd.data.task import Problem, Task, TaskError

__all__ = [
    "SyntheticArithmeticTask",
    "check_connectives",
    "count_solutions",
    "enumerate_solutions",
    "num_steps",
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


def num_steps(state: State) -> int:
    """Steps every solution of ``state`` takes: one per product and one per ``+``."""
    return sum(t[0] == "m" for t in state) + len(state) - 1


@functools.lru_cache(maxsize=65536)
def _count_orders(state: State) -> int:
    if _is_final(state):
        return 1
    return sum(_count_orders(nxt) for _, nxt in next_steps(state))


def _count_orders_upto(state: State, limit: int) -> int:
    """``min(_count_orders(state), limit)``, stopping as soon as ``limit`` orders are found: at
    most ``limit`` complete orders are walked (the full count grows super-exponentially with the
    number of terms: seconds at 9 terms, hours at 12)."""
    if _is_final(state):
        return 1
    found = 0
    for _, nxt in next_steps(state):
        found += _count_orders_upto(nxt, limit - found)
        if found >= limit:
            return limit
    return found


def count_solutions(state: State, connectives: Sequence[str] = (), limit: int | None = None) -> int:
    """Number of distinct valid solutions of ``state``; with ``limit``, ``min(count, limit)``.

    Each step may start with any of the ``connectives``, so they multiply the number of operation
    orders by ``len(connectives) ** num_steps(state)``. The exact count is feasible only for
    short expressions (9 terms take seconds); ``limit`` makes it cheap at any length.
    """
    per_order = max(1, len(connectives)) ** num_steps(state)
    if limit is None:
        return _count_orders(state) * per_order
    if limit < 1 or per_order >= limit:  # every expression has at least one order
        return min(limit, per_order)
    return min(limit, _count_orders_upto(state, -(-limit // per_order)) * per_order)


def enumerate_solutions(
    state: State, limit: int | None = None, connectives: Sequence[str] = ()
) -> Iterator[str]:
    """Yield the distinct valid solution texts of ``state`` (depth first, at most ``limit``)."""
    answer = value_of(state)
    words = tuple(connectives) or ("",)
    produced = 0

    def walk(s: State, prefix: str) -> Iterator[str]:
        if _is_final(s):
            yield f"{prefix}\\boxed{{{answer}}}"
            return
        for text, nxt in next_steps(s):
            for word in words:
                yield from walk(nxt, f"{prefix}{word}{text};")

    for sol in walk(state, ""):
        yield sol
        produced += 1
        if limit is not None and produced >= limit:
            return


def sample_solution(state: State, rng: random.Random, connectives: Sequence[str] = ()) -> str:
    """One valid solution: each step's operation (and connective) chosen uniformly."""
    parts = []
    answer = value_of(state)
    while not _is_final(state):
        text, state = rng.choice(next_steps(state))
        word = rng.choice(tuple(connectives)) if connectives else ""
        parts.append(f"{word}{text};")
    return "".join(parts) + f"\\boxed{{{answer}}}"


def verify_solution(state: State, text: str, connectives: Sequence[str] = ()) -> bool:
    """Whether ``text`` is a complete valid solution of ``state`` (every step and the answer)."""
    *steps, last = text.strip().split(";")
    for step in steps:
        if connectives:
            word = next((w for w in connectives if step.startswith(w)), None)
            if word is None:
                return False
            step = step[len(word) :]
        options = dict(next_steps(state))
        if step not in options:
            return False
        state = options[step]
    # the whole last segment is the box (text around it made a "complete" solution of garbage)
    return _is_final(state) and last == f"\\boxed{{{state[0][1]}}}"


def check_connectives(connectives: Sequence[str]) -> tuple[str, ...]:
    """Validate connective words: lowercase letters, distinct, none a prefix of another."""
    words = tuple(connectives)
    for w in words:
        if not w.isalpha() or not w.islower():
            raise TaskError(f"connective {w!r} must be lowercase letters only")
    for a in words:
        for b in words:
            if a != b and b.startswith(a):
                raise TaskError(f"connective {a!r} is a prefix of {b!r}")
    if len(set(words)) != len(words):
        raise TaskError(f"connectives repeat: {words}")
    return words


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
    SYMBOLS = ("+", "*", "=", ">", ";", ":", "\\boxed{", "}")

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
        connectives: Sequence[str] = ("so", "then", "next", "now"),
    ):
        if not 2 <= min_terms <= max_terms:
            raise TaskError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if max_operand < 2:
            raise TaskError(f"max_operand must be >= 2, got {max_operand}")
        self.seed = seed
        self.min_terms, self.max_terms = min_terms, max_terms
        self.max_operand, self.product_prob = max_operand, product_prob
        self.solutions_per_problem = solutions_per_problem
        self.connectives = check_connectives(connectives)
        #: single pieces of the task tokenizer: numbers never merge with operators, and the first
        #: tokens of a step are exactly its choices (connective, then first operand)
        self.tokenizer_symbols = (*self.SYMBOLS, *self.connectives)
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
            connectives=self.connectives,
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
                want = count_solutions(state, self.connectives, limit=self.solutions_per_problem)
                found: dict[str, None] = {}
                for _ in range(8 * want):
                    found[sample_solution(state, rng, self.connectives)] = None
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
        return verify_solution(self.state_of(problem), response, self.connectives)

    def num_solutions(self, problem: Problem) -> int:
        """Number of distinct valid solutions of ``problem``."""
        return count_solutions(self.state_of(problem), self.connectives)

    def solutions(self, problem: Problem, limit: int | None = None) -> list[str]:
        """The distinct valid solutions of ``problem`` (at most ``limit``)."""
        return list(enumerate_solutions(self.state_of(problem), limit, self.connectives))

    def oracle_entropies(self, problem: Problem, solution: str, tokenizer: Any) -> list[float]:
        """Per-token entropy (nats) of the task's own solution policy along ``solution``.

        The policy is the one the reference solutions are drawn from (each step's connective and
        operation uniform among the valid ones); its next-token distribution is what an ideal
        teacher trained on the training solutions would predict. One value per token of
        ``encode(solution)`` plus one for the EOS (0). Tokens inside a step after its choices
        have entropy 0; the branch points (connective, operands) carry it.
        """
        state = self.state_of(problem)
        *steps, last = solution.split(";")
        words = self.connectives or ("",)
        out: list[float] = []
        for step in steps:
            nxt = dict(next_steps(state))
            options = [tokenizer.encode(f"{w}{t};") for t in nxt for w in words]
            chosen = tokenizer.encode(step + ";")
            for j, tok in enumerate(chosen):
                counts: dict[int, int] = {}
                for o in options:
                    if len(o) > j and o[:j] == chosen[:j]:
                        counts[o[j]] = counts.get(o[j], 0) + 1
                if tok not in counts:
                    raise ValueError(f"not a valid step here: {step!r}")
                n = sum(counts.values())
                out.append(-sum(c / n * math.log(c / n) for c in counts.values()))
            word = next(w for w in words if step.startswith(w))
            state = nxt[step[len(word) :]]
        return out + [0.0] * (len(tokenizer.encode(last)) + 1)

    def fingerprint(self) -> str:
        """Hash of the settings (the splits are a pure function of them) and the format."""
        text = repr(sorted(self.settings.items())) + self.PROMPT + "v2"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
