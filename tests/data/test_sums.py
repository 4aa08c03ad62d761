"""The any-order sum task (kind: sums): verifier, branch points, splits, tokenizer."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from megatron_eaopd.data.sums import (
    AnyOrderSumTask,
    count_sum_solutions,
    enumerate_sum_solutions,
    sample_sum_solution,
    sum_step_options,
    verify_sum_solution,
)
from megatron_eaopd.data.tokenizer import train_tokenizer

SMALL = dict(num_train=200, num_distill=100, num_eval=40)


@pytest.fixture(scope="module")
def task():
    return AnyOrderSumTask(seed=3, **SMALL)


@pytest.fixture(scope="module")
def tokenizer(task, tmp_path_factory):
    return train_tokenizer(task.corpus(), tmp_path_factory.mktemp("tok"), 128,
                           task.tokenizer_symbols)  # fmt: skip


def _written_by_hand(order) -> str:
    """A solution for the numbers in ``order``, built independently of the module's code."""
    total = order[0] + order[1]
    text = f"{order[0]}+{order[1]}={total};"
    for c in order[2:]:
        total += c
        text += f"+{c}={total};"
    return text + "\\boxed{" + str(total) + "}"


@pytest.mark.parametrize("numbers", [(3, 7, 5, 2), (1, 1, 6, 8, 1), (9, 9, 9, 9), (4, 2, 4, 2, 7)])
def test_verifier_accepts_every_order_and_enumeration_is_complete(numbers):
    expected = {_written_by_hand(p) for p in itertools.permutations(numbers)}
    enumerated = list(enumerate_sum_solutions(numbers))
    assert set(enumerated) == expected
    assert len(enumerated) == len(expected) == count_sum_solutions(numbers)
    for text in expected:
        assert verify_sum_solution(numbers, text)
        assert verify_sum_solution(list(reversed(numbers)), text)  # the prompt order is free


def test_counts():
    assert count_sum_solutions((3, 7, 5, 2)) == 24
    assert count_sum_solutions((1, 1, 6, 8, 1)) == 20
    assert count_sum_solutions((9, 9, 9, 9)) == 1


@pytest.mark.parametrize(
    "text",
    [
        "3+7=10;+5=15;+2=18;\\boxed{18}",  # wrong total in a step
        "3+7=10;+5=15;+2=17;\\boxed{18}",  # box differs from the last total
        "3+7=10;+5=15;+5=20;\\boxed{20}",  # 5 used twice, 2 never
        "3+7=10;+5=15;\\boxed{15}",  # a number missing
        "3+7=10;+5=15;+2=17;+1=18;\\boxed{18}",  # a number that is not in the list
        "3+7=10;+5=15;+2=17;\\boxed{17}x",  # text after the box
        "3+7=10;+5=15;+2=17;",  # no box
        "\\boxed{17}",  # the right answer without the steps
        "3+7=10;+5=15;+2=17;\\boxed{017}",  # not a canonical number
        "03+7=10;+5=15;+2=17;\\boxed{17}",
        "3+7=10;5+2=7;+0=17;\\boxed{17}",  # a second pair
        "3+7=10;+5=15;+2=17;\\boxed{17};\\boxed{17}",
        "3*7=10;+5=15;+2=17;\\boxed{17}",
        "",
    ],
)
def test_verifier_rejects_wrong_solutions(text):
    assert not verify_sum_solution((3, 7, 5, 2), text)
    assert verify_sum_solution((3, 7, 5, 2), "3+7=10;+5=15;+2=17;\\boxed{17}")
    assert verify_sum_solution((3, 7, 5, 2), " 3+7=10;+5=15;+2=17;\\boxed{17}\n")


def test_check_uses_the_verifier(task):
    p = task.eval_problems()[0]
    numbers = task.numbers_of(p)
    good = sample_sum_solution(numbers, random.Random(0))
    assert task.check(good, p) and task.check_reasoning(good, p)
    # the right boxed value reached by wrong steps is wrong
    assert not task.check(f"1+1=2;\\boxed{{{p.answer}}}", p)
    assert not task.check(f"\\boxed{{{p.answer}}}", p)


def test_branch_points_exist_and_the_rest_is_determined():
    opts = sum_step_options([3, 7, 5, 2], None)
    assert len(opts) == 12  # ordered pairs of 4 distinct numbers
    assert sum_step_options([1, 1, 6], None) == ["1+1=2;", "1+6=7;", "6+1=7;"]
    assert sum_step_options([5, 2], 10) == ["+2=12;", "+5=15;"]
    assert sum_step_options([], 17) == ["\\boxed{17}"]


def test_oracle_entropies_sit_on_the_choices(task, tokenizer):
    p = AnyOrderSumTask(seed=3, **SMALL).eval_problems()[0]
    numbers = (3, 7, 5, 2, 9)
    p = type(p)(uid="x", prompt="sum(3,7,5,2,9):", answer="26", meta={"numbers": numbers})
    text = "3+7=10;+5=15;+2=17;+9=26;\\boxed{26}"
    ent = task.oracle_entropies(p, text, tokenizer)
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]
    assert len(ent) == len(pieces) + 1
    nonzero = {i: e for i, e in enumerate(ent) if e > 1e-12}
    # the first two numbers (5 then 4 choices) and each later number (3, 2 choices; last: 1)
    assert nonzero == pytest.approx(
        {0: math.log(5), 2: math.log(4), 7: math.log(3), 12: math.log(2)}
    )
    assert [pieces[i] for i in nonzero] == ["3", "7", "5", "2"]


def test_oracle_high_entropy_fraction_in_range(task, tokenizer):
    rng = random.Random(0)
    fracs = []
    for p in task.eval_problems():
        text = sample_sum_solution(task.numbers_of(p), rng)
        ent = task.oracle_entropies(p, text, tokenizer)
        fracs.append(sum(e >= 0.8 for e in ent) / len(ent))
    assert 0.09 < sum(fracs) / len(fracs) < 0.15


def test_numbers_are_single_tokens_shared_by_prompt_and_response(task, tokenizer):
    for n in range(0, task.max_terms * task.max_operand + 1):
        assert len(tokenizer.encode(str(n))) == 1
    p = task.train_problems()[0]
    prompt_ids = tokenizer.encode(p.prompt)
    for n in task.numbers_of(p):
        assert tokenizer.encode(str(n))[0] in prompt_ids
    for text in [p.prompt, *p.solutions]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_splits_deterministic_disjoint_and_solutions_valid(task):
    again = AnyOrderSumTask(seed=3, **SMALL)
    assert [p.prompt for p in again.eval_problems()] == [p.prompt for p in task.eval_problems()]
    keys = {}
    for name, split in [("eval", task.eval_problems()), ("distill", task.distill_problems()),
                        ("train", task.train_problems())]:  # fmt: skip
        for p in split:
            key = tuple(sorted(task.numbers_of(p)))
            assert key not in keys, (p.uid, keys.get(key))
            keys[key] = name
            assert 4 <= len(key) <= 5 and all(1 <= n <= 13 for n in key)
            assert len(set(key)) == len(key)  # distinct numbers
            assert p.answer == str(sum(key))
    # the eval set does not depend on the sizes of the other splits
    bigger = AnyOrderSumTask(seed=3, num_train=300, num_distill=50, num_eval=40, max_operand=13)
    assert [p.prompt for p in bigger.eval_problems()] == [p.prompt for p in task.eval_problems()]
    for p in task.train_problems():
        assert len(set(p.solutions)) == 4 == len(p.solutions)
        assert all(task.check(s, p) for s in p.solutions)
        assert task.numbers_of(p) == tuple(int(x) for x in p.prompt[4:-2].split(","))


def test_solutions_cover_the_orders(task):
    p = task.eval_problems()[1]
    sols = task.solutions(p)
    assert len(sols) == task.num_solutions(p) == len(set(sols))
    assert Counter(s.split("+", 1)[0] for s in sols).keys() == set(map(str, task.numbers_of(p)))


def test_too_many_problems_is_refused():
    with pytest.raises(ValueError, match="cannot draw"):
        AnyOrderSumTask(num_train=5000, num_distill=10, num_eval=10, max_operand=6)
    with pytest.raises(ValueError, match="distinct"):
        AnyOrderSumTask(min_terms=4, max_terms=5, max_operand=4)
