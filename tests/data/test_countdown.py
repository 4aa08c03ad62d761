"""The built-in CPU task (kind: countdown): the verifier, the branch points, the splits."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from megatron_eaopd.config import load_config
from megatron_eaopd.data import load_task
from megatron_eaopd.data.countdown import (
    CountdownTask,
    count_countdown_solutions,
    countdown_error,
    countdown_step_options,
    enumerate_countdown_solutions,
    sample_countdown_solution,
    verify_countdown,
)
from megatron_eaopd.data.task import Problem, Task
from megatron_eaopd.data.tokenizer import train_tokenizer

SMALL = dict(num_train=150, num_distill=100, num_eval=40)


@pytest.fixture(scope="module")
def task():
    return CountdownTask(seed=3, **SMALL)


@pytest.fixture(scope="module")
def tokenizer(task, tmp_path_factory):
    return train_tokenizer(task.corpus(), tmp_path_factory.mktemp("tok"), 128,
                           task.tokenizer_symbols)  # fmt: skip


def _by_brute_force(start, steps):
    """Every valid solution, from all sequences of allowed sizes summing to ``start``."""
    out = set()
    for n in range(1, start + 1):
        for seq in itertools.product(sorted(steps), repeat=n):
            if sum(seq) == start:
                left, text = start, ""
                for s in seq:
                    left -= s
                    text += f"-{s}={left};"
                out.add(text)
    return out


@pytest.mark.parametrize("start,steps", [(7, (1, 3, 5)), (9, (1, 4, 6, 8)), (6, (1, 2, 3))])
def test_verifier_accepts_every_solution_and_enumeration_is_complete(start, steps):
    expected = _by_brute_force(start, steps)
    enumerated = list(enumerate_countdown_solutions(start, steps))
    assert set(enumerated) == expected and len(enumerated) == len(expected)
    assert count_countdown_solutions(start, steps) == len(expected)
    for text in expected:
        assert verify_countdown(start, steps, text)
        assert verify_countdown(start, steps, f" {text}\n")


def test_counts():
    assert count_countdown_solutions(4, (1, 2)) == 5  # 1111 112 121 211 22
    assert count_countdown_solutions(5, (1, 3, 5)) == 5  # 11111 113 131 311 5


@pytest.mark.parametrize(
    "text",
    [
        "-5=12;-5=7;-5=2;-1=1;-1=0;",  # correct
    ],
)
def test_a_valid_solution(text):
    assert verify_countdown(17, (1, 3, 5), text)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("-5=12;-5=7;-5=2;-2=0;", "size not allowed"),  # 2 is not allowed
        ("-5=12;-5=7;-5=2;-3=-1;", "below zero"),  # written as a negative number
        ("-5=12;-5=7;-5=2;-3=0;", "below zero"),  # 3 does not fit under 2
        ("-5=12;-5=7;-5=3;-3=0;", "subtraction"),  # wrong subtraction
        ("-5=12;-5=7;-5=2;-1=1;", "not at zero"),  # stops before 0
        ("-5=12;-5=7;-5=2;-1=1;-1=0", "unfinished"),  # no final ';'
        ("-5=12;-5=7;-5=2;-1=1;-1=0;-1=0;", "below zero"),  # a step past 0
        ("-5=12;-5=7;-5=2;-1=1;-1=0;x", "text after the end"),
        ("-05=12;-5=7;-5=2;-1=1;-1=0;", "malformed"),  # not a canonical number
        ("-5=12;;-5=7;-5=2;-1=1;-1=0;", "malformed"),
        ("-5=12;-5=7;-5=2;-1=1;-1=0;\\boxed{0}", "text after the end"),
        ("-5=12;-3=-9;", "subtraction"),  # fits, but written as a negative number
        ("\\boxed{0}", "unfinished"),  # no complete step
        (";", "malformed"),
        ("", "unfinished"),
    ],
)
def test_verifier_rejects_wrong_solutions_and_names_the_first_failed_check(text, kind):
    assert not verify_countdown(17, (1, 3, 5), text)
    assert countdown_error(17, (1, 3, 5), text).split(":")[0] == kind


def test_explain_is_none_exactly_for_accepted_responses(task):
    """Over mutated valid solutions (a changed, dropped or inserted character, the last steps
    dropped, or unchanged): ``explain`` is None exactly when the verifier accepts, and so is
    the base class's default (which says only "wrong answer")."""
    rng = random.Random(5)
    alphabet = "0123456789-=;"
    kinds = set()
    for p in task.eval_problems()[:20]:
        start, steps = task.problem_of(p)
        for _ in range(30):
            text = list(sample_countdown_solution(start, steps, rng))
            i = rng.randrange(len(text))
            op = rng.randrange(5)
            if op == 3:  # drop the last steps
                ends = [j for j, c in enumerate(text) if c == ";"]
                text = text[: ends[rng.randrange(len(ends))] + 1]
            elif op == 0:
                text[i] = rng.choice(alphabet)
            elif op == 1:
                del text[i]
            elif op == 2:
                text.insert(i, rng.choice(alphabet))
            text = "".join(text)
            why = task.explain(text, p)
            assert (why is None) == task.check(text, p), (text, why)
            assert (Task.explain(task, text, p) is None) == task.check(text, p)
            if why is not None:
                kinds.add(why.split(":")[0])
    assert {"size not allowed", "subtraction", "malformed", "not at zero"} <= kinds


def test_check_uses_the_verifier(task):
    p = task.eval_problems()[0]
    start, steps = task.problem_of(p)
    good = sample_countdown_solution(start, steps, random.Random(0))
    assert task.check(good, p) and task.check_reasoning(good, p)
    assert not task.check(good[: good.rindex("-")], p)
    assert not task.check("\\boxed{0}", p)


def test_branch_points_exist_and_the_rest_is_determined(task, tokenizer):
    assert countdown_step_options(17, (1, 3, 5)) == ["-1=16;", "-3=14;", "-5=12;"]
    assert countdown_step_options(2, (1, 3, 5)) == ["-1=1;"]
    p = Problem(uid="x", prompt="down(17|1,3,5):", answer="0",
                meta={"start": 17, "steps": (1, 3, 5)})  # fmt: skip
    text = "-5=12;-5=7;-5=2;-1=1;-1=0;"
    ent = task.oracle_entropies(p, text, tokenizer)
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]
    assert len(ent) == len(pieces) + 1
    nonzero = {i: e for i, e in enumerate(ent) if e > 1e-12}
    # the step sizes: 3 fit at 17, 12 and 7; only 1 fits at 2 and at 1
    assert nonzero == pytest.approx({1: math.log(3), 6: math.log(3), 11: math.log(3)})
    assert [pieces[i] for i in nonzero] == ["5", "5", "5"]


def test_every_problem_has_several_solutions_and_branch_points(task, tokenizer):
    rng = random.Random(0)
    fracs = []
    for p in task.eval_problems():
        assert task.num_solutions(p) >= 3
        start, steps = task.problem_of(p)
        assert 1 in steps and len(steps) in (3, 4) and 10 <= start <= 22
        text = sample_countdown_solution(start, steps, rng)
        ent = task.oracle_entropies(p, text, tokenizer)
        assert ent[1] >= math.log(2)  # the first step size is a real choice
        fracs.append(sum(e >= 0.8 for e in ent) / len(ent))
    assert 0.08 < sum(fracs) / len(fracs) < 0.2


def test_numbers_are_single_tokens_shared_by_prompt_and_response(task, tokenizer):
    for n in range(0, task.max_start + 1):
        assert len(tokenizer.encode(str(n))) == 1
    p = task.train_problems()[0]
    prompt_ids = tokenizer.encode(p.prompt)
    for s in task.problem_of(p)[1]:
        assert tokenizer.encode(str(s))[0] in prompt_ids
    for text in [p.prompt, *p.solutions]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_splits_deterministic_disjoint_and_solutions_valid(task):
    again = CountdownTask(seed=3, **SMALL)
    assert [p.prompt for p in again.eval_problems()] == [p.prompt for p in task.eval_problems()]
    seen = {}
    for name, split in [("eval", task.eval_problems()), ("distill", task.distill_problems()),
                        ("train", task.train_problems())]:  # fmt: skip
        for p in split:
            key = task.problem_of(p)
            assert key not in seen, (p.uid, seen.get(key))
            seen[key] = name
            assert p.prompt == "down({}|{}):".format(key[0], ",".join(map(str, key[1])))
    bigger = CountdownTask(seed=3, num_train=300, num_distill=50, num_eval=40)
    assert [p.prompt for p in bigger.eval_problems()] == [p.prompt for p in task.eval_problems()]
    for p in task.train_problems():
        want = min(task.solutions_per_problem, task.num_solutions(p))
        assert len(set(p.solutions)) == len(p.solutions) == want
        assert all(task.check(s, p) for s in p.solutions)


def test_solutions_and_bad_settings(task):
    p = task.eval_problems()[1]
    sols = task.solutions(p, limit=50)
    assert len(sols) == min(50, task.num_solutions(p)) == len(set(sols))
    assert all(task.check(s, p) for s in sols)
    with pytest.raises(ValueError, match="cannot draw"):
        CountdownTask(num_train=5000, num_distill=10, num_eval=10, min_terms=10, max_terms=12)
    with pytest.raises(ValueError, match="max_operand"):
        CountdownTask(max_operand=3)


def test_the_cpu_config_names_the_task():
    cfg = load_config("configs/tiny-cpu.yaml")
    assert cfg.task.name == "builtin" and cfg.task.synthetic.kind == "countdown"
    task = load_task(cfg.task)
    assert isinstance(task, CountdownTask)
    assert len(task.eval_problems()) == cfg.task.synthetic.num_eval
