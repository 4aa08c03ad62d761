"""The built-in synthetic arithmetic task: determinism, disjoint splits, several valid paths."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest

from megatron_eaopd.data.synthetic import (
    SyntheticArithmeticTask,
    count_solutions,
    enumerate_solutions,
    parse_expression,
    sample_solution,
    verify_solution,
)

SMALL = dict(num_train=300, num_distill=120, num_eval=60)
CONNECTIVES = ("so", "then", "next", "now")


@pytest.fixture(scope="module")
def task():
    return SyntheticArithmeticTask(seed=3, **SMALL)


def _py_value(expr: str) -> int:
    """Independent evaluation of an expression text with Python's own arithmetic."""
    assert re.fullmatch(r"[0-9+*]+", expr)
    return eval(expr)  # noqa: S307 - digits, + and * only (checked above)


def _canonical(expr: str) -> tuple:
    """Terms as a sorted multiset, factors sorted: the same expression up to reordering."""
    return tuple(sorted("*".join(sorted(t.split("*"), key=int)) for t in expr.split("+")))


def _check_steps_independently(expr: str, solution: str, connectives=CONNECTIVES) -> None:
    """Every step is true arithmetic, keeps the value, removes exactly one operator."""
    *steps, last = solution.split(";")
    value = _py_value(expr)
    ops = expr.count("+") + expr.count("*")
    state = expr
    for step in steps:
        word = re.match(r"[a-z]*", step).group(0)
        assert word in connectives or (not connectives and word == "")
        lhs, rest = step[len(word) :].split("=", 1)
        result, new_state = rest.split(">", 1)
        assert _py_value(lhs) == int(result)
        assert len(re.findall(r"[+*]", lhs)) == 1
        # the operation's operands are terms (or factors) of the current state
        assert all(x in re.split(r"[+*]", state) for x in re.split(r"[+*]", lhs))
        assert _py_value(new_state) == value
        assert new_state.count("+") + new_state.count("*") == ops - 1
        ops -= 1
        state = new_state
    assert ops == 0 and last == f"\\boxed{{{value}}}"


def test_deterministic_from_seed():
    a = SyntheticArithmeticTask(seed=11, **SMALL)
    b = SyntheticArithmeticTask(seed=11, **SMALL)
    c = SyntheticArithmeticTask(seed=12, **SMALL)
    for split in ("train_problems", "distill_problems", "eval_problems"):
        assert getattr(a, split)() == getattr(b, split)()
        assert getattr(a, split)() != getattr(c, split)()
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_split_sizes_and_disjoint(task):
    splits = {
        "train": task.train_problems(),
        "distill": task.distill_problems(),
        "eval": task.eval_problems(),
    }
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "distill": 120, "eval": 60}
    keys = {k: {_canonical(p.meta["expression"]) for p in v} for k, v in splits.items()}
    for k, v in splits.items():
        assert len(keys[k]) == len(v), f"duplicates inside {k}"
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], f"{a} and {b} overlap"
    uids = [p.uid for v in splits.values() for p in v]
    assert len(set(uids)) == len(uids)


def test_eval_split_does_not_depend_on_train_size():
    small = SyntheticArithmeticTask(seed=5, num_train=10, num_distill=50, num_eval=40)
    big = SyntheticArithmeticTask(seed=5, num_train=500, num_distill=50, num_eval=40)
    assert small.eval_problems() == big.eval_problems()
    assert small.distill_problems() == big.distill_problems()


def test_answers_are_the_expression_values(task):
    for p in (*task.train_problems(), *task.eval_problems()):
        expr = p.meta["expression"]
        assert p.answer == str(_py_value(expr))
        assert expr in p.prompt
        n_terms = expr.count("+") + 1
        assert 3 <= n_terms <= 4


def test_training_solutions_are_valid_and_distinct(task):
    for p in task.train_problems():
        assert 1 <= len(p.solutions) <= 4
        assert len(set(p.solutions)) == len(p.solutions)
        assert len(p.solutions) == min(4, task.num_solutions(p))
        for sol in p.solutions:
            _check_steps_independently(p.meta["expression"], sol)
            assert task.check_reasoning(sol, p)
            assert task.check(sol, p)


def test_several_solution_paths_exist(task):
    plain = SyntheticArithmeticTask(seed=3, connectives=(), **SMALL)
    assert [p.prompt for p in plain.eval_problems()] == [p.prompt for p in task.eval_problems()]
    counts = [plain.num_solutions(p) for p in plain.eval_problems()]
    # several operation orders even without connectives
    assert sum(c > 1 for c in counts) / len(counts) >= 0.9
    # the enumerator finds exactly count_solutions distinct paths, all valid
    for p in plain.eval_problems()[:15]:
        sols = plain.solutions(p)
        assert len(sols) == len(set(sols)) == plain.num_solutions(p) > 1
        for sol in sols[:50]:
            _check_steps_independently(p.meta["expression"], sol, ())
    # connectives multiply every step's choices
    for p, c in zip(task.eval_problems()[:5], counts):
        steps = p.meta["expression"].count("+") + p.meta["expression"].count("*")
        assert task.num_solutions(p) == c * len(CONNECTIVES) ** steps
        sols = task.solutions(p, limit=3000)
        assert len(set(sols)) == len(sols) == min(3000, task.num_solutions(p))
        for sol in sols[::97]:
            _check_steps_independently(p.meta["expression"], sol)
            assert task.check_reasoning(sol, p)


def test_first_step_is_a_genuine_branch_point(task):
    """Most problems admit several different first operations (what the teacher is unsure of)."""
    plain = SyntheticArithmeticTask(seed=3, connectives=(), **SMALL)
    firsts = []
    for p in plain.eval_problems():
        first_ops = {s.split("=", 1)[0] for s in plain.solutions(p, limit=None)}
        firsts.append(len(first_ops))
    assert min(firsts) >= 2
    assert sum(n >= 3 for n in firsts) / len(firsts) >= 0.75


@pytest.mark.parametrize("numbers", [[1, 10, 100], [1, 10, 100, 1000], [3, 40, 500, 6000]])
def test_count_matches_closed_form(numbers):
    """Sums of numbers whose partial sums are all distinct: every ordered pair at every step is a
    distinct path, so there are prod_{k=2..n} k(k-1) of them."""
    state = tuple(("n", x) for x in numbers)
    expected = math.prod(k * (k - 1) for k in range(2, len(numbers) + 1))
    assert count_solutions(state) == expected
    assert len(set(enumerate_solutions(state))) == expected
    steps = len(numbers) - 1
    assert count_solutions(state, ("a", "b")) == expected * 2**steps
    assert len(set(enumerate_solutions(state, None, ("a", "b")))) == expected * 2**steps


def test_products_multiply_the_orders():
    """Two products and nothing else: 2 orders of the products x 2 orders of the final sum."""
    state = parse_expression("2*3+4*5")
    assert count_solutions(state) == 2 * 2


@pytest.mark.parametrize("expr", ["2*3+4*5", "1+10+100+1000", "2+3*4+5+6*7", "7+7+7"])
@pytest.mark.parametrize("connectives", [(), ("a",), ("a", "b")])
@pytest.mark.parametrize("limit", [1, 2, 3, 4, 8, 50, 1000, 10**9])
def test_a_limited_count_is_the_count_cut_at_the_limit(expr, connectives, limit):
    state = parse_expression(expr)
    assert count_solutions(state, connectives, limit) == min(
        count_solutions(state, connectives), limit
    )


def test_a_limited_count_of_a_long_expression_is_immediate():
    """The task keeps at most solutions_per_problem paths, so it counts only that far: the full
    count of a 22-term expression would take hours (tiny-cpu.yaml's 10..22 terms with kind
    arith hung in prepare_data)."""
    import time

    state = tuple(("n", 10**k) for k in range(22))
    start = time.perf_counter()
    assert count_solutions(state, (), 8) == 8
    assert count_solutions(state, CONNECTIVES, 8) == 8
    task = SyntheticArithmeticTask(
        num_train=8,
        num_distill=4,
        num_eval=4,
        min_terms=16,
        max_terms=22,
        solutions_per_problem=8,
        connectives=(),
    )
    assert all(len(p.solutions) == 8 for p in task.train_problems())
    assert time.perf_counter() - start < 30


def test_the_splits_of_fixed_settings_do_not_change():
    """Run caches (tokenizers, prepared models) key on the settings, not the problems: the
    problems of given settings must stay the same across versions."""
    import hashlib

    task = SyntheticArithmeticTask(num_train=300, num_distill=60, num_eval=30, max_terms=6,
                                   solutions_per_problem=64, connectives=())  # fmt: skip
    digest = hashlib.sha256()
    for split in (task.eval_problems(), task.distill_problems(), task.train_problems()):
        for p in split:
            digest.update(repr((p.uid, p.prompt, p.answer, p.solutions, p.meta)).encode())
    assert digest.hexdigest()[:16] == "9cd58dff0c521059"  # computed before the counting limit


def test_verify_rejects_wrong_paths():
    state = parse_expression("2*3+4+5")
    good = sample_solution(state, random.Random(0))
    assert verify_solution(state, good)
    assert not verify_solution(state, good.replace("\\boxed{15}", "\\boxed{16}"))
    assert not verify_solution(state, "2*3=7>7+4+5;7+4=11>11+5;11+5=16>16;\\boxed{16}")
    assert not verify_solution(state, "4+5=9>2*3+9;\\boxed{15}")  # incomplete
    assert not verify_solution(state, "2*3+4=10>10+5;10+5=15>15;\\boxed{15}")  # two ops at once
    worded = sample_solution(state, random.Random(0), ("so", "then"))
    assert verify_solution(state, worded, ("so", "then"))
    assert not verify_solution(state, worded, ())
    assert not verify_solution(state, good, ("so", "then"))  # a step without its connective
    # the last segment is the box alone, as in countdown and sums: no text around it
    assert not verify_solution(state, good + " and then some garbage")
    head, box = good.rsplit(";", 1)
    assert not verify_solution(state, f"{head};GARBAGE{box}")


def test_check_uses_the_boxed_answer(task):
    p = task.eval_problems()[0]
    assert task.check(f"whatever;\\boxed{{{p.answer}}}", p)
    assert not task.check(f"\\boxed{{{int(p.answer) + 1}}}", p)
    assert not task.check(p.answer, p)  # no box, no credit
    assert task.reward(f"\\boxed{{{p.answer}}}", p) == 1.0


def test_too_many_problems_for_the_space():
    with pytest.raises(ValueError, match="distinct"):
        SyntheticArithmeticTask(
            num_train=0,
            num_distill=10,
            num_eval=400,
            min_terms=2,
            max_terms=2,
            max_operand=3,
            product_prob=0.0,
        )


def test_bad_connectives():
    for bad in (("so", "sot"), ("So",), ("a1",), ("x", "x")):
        with pytest.raises(ValueError, match="connective"):
            SyntheticArithmeticTask(connectives=bad, **SMALL)


def test_oracle_entropy_sits_at_the_branch_points(task, tmp_path):
    """The solution policy's token entropy: ln(#connectives) at each step's first token, the
    operation choice right after it, zero on the determined rest of the step."""
    from megatron_eaopd.data import train_tokenizer

    tok = train_tokenizer(task.corpus(), tmp_path, 320, task.tokenizer_symbols)
    rng = random.Random(0)
    high = total = rewrite_tokens = rewrite_uncertain = 0
    for p in task.eval_problems():
        sol = sample_solution(task.state_of(p), rng, CONNECTIVES)
        ents = task.oracle_entropies(p, sol, tok)
        ids = tok.encode(sol)
        assert len(ents) == len(ids) + 1
        pieces = [tok.id_to_piece(i) for i in ids]
        region = "op"
        for piece, h in zip(pieces, ents):
            region = {"=": "result", ">": "rewrite", ";": "sep", "\\boxed{": "answer"}.get(
                piece, "op" if piece in CONNECTIVES else region
            )
            if piece in CONNECTIVES:
                assert h == pytest.approx(math.log(len(CONNECTIVES)))
            elif region in ("result", "sep", "answer"):
                assert h == pytest.approx(0.0, abs=1e-12), (sol, piece)
            elif region == "rewrite":
                # determined, except when equal numbers make the same operation text lead to
                # different rewrites (5+7+5: '7+5' uses either 5)
                rewrite_tokens += 1
                rewrite_uncertain += h > 1e-12
        assert ents[-1] == 0.0  # EOS
        high += sum(h > 0.8 for h in ents)
        total += len(ents)
    assert 0.08 < high / total < 0.5
    assert rewrite_uncertain / rewrite_tokens < 0.02
