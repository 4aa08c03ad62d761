"""\\boxed{} extraction and answer checking (normalised fallback; math-verify when installed)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from megatron_eaopd.data.answers import (
    check_answer,
    extract_boxed,
    math_verify_available,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 apples", "5"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
        ("\\boxed{3} and then \\boxed{4", None),  # cut off in its final box: no final answer
        ("\\boxed{7} is wrong; the answer is \\boxed", None),
        ("\\fbox{1} then \\boxed{2} then \\fbox{3}", "3"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "answer, value",
    [
        ("3", Fraction(3)),
        ("-0.25", Fraction(-1, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac34", Fraction(3, 4)),
        ("-\\frac{1}{3}", Fraction(-1, 3)),
        ("6/8", Fraction(3, 4)),
        ("1,000", Fraction(1000)),
        ("50\\%", Fraction(1, 2)),
        ("$12$", Fraction(12)),
        ("x+1", None),
        ("1/0", None),
        ("\\frac{12}{3}", Fraction(4)),
        ("\\frac123", None),  # LaTeX: (1/2)3, not 12/3
        ("\\$18.90", Fraction(189, 10)),
        ("9" * 4400, None),  # a model looping on digits: not a number, not a crash
        ("\\frac{" + "3" * 4400 + "}{7}", None),
        ("1e10000000", None),  # would take minutes as an exact Fraction
        ("1e-1001", None),
        ("2.5e3", Fraction(2500)),
    ],
)
def test_parse_number(answer, value):
    assert parse_number(answer) == value


@pytest.mark.parametrize(
    "response, reference, ok",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac{1}{2}}", "1/2", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{1{,}000}", "1000", True),  # LaTeX's thousands separator (MATH answers)
        ("\\boxed{-12{,}345.5}", "-12345.5", True),
        ("\\boxed{ 12 }", "12", True),
        ("\\boxed{12.}", "12", True),
        ("\\boxed{\\text{(B)}}", "(B)", True),
        ("\\boxed{x^2 + 1}", "x^2+1", True),
        ("\\boxed{90^\\circ}", "90", True),
        ("\\boxed{13}", "12", False),
        ("12", "12", False),
        ("\\boxed{0.3333}", "\\frac{1}{3}", False),
        ("\\boxed{18.9}", "\\$18.90", True),
        ("\\boxed{\\$5}", "5", True),
        ("\\boxed{\\frac123}", "4", False),
        ("\\boxed " + "9" * 4400, "5", False),
        ("\\boxed{" + f"{2**530:,}" + "}", str(2**530), True),  # 213 characters with commas
        # the same LaTeX written two ways, as MATH references and models do
        ("\\boxed{\\sqrt{2}}", "\\sqrt2", True),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
        ("\\boxed{x^{2}+1}", "x^2+1", True),
        ("\\boxed{a_{n}}", "a_n", True),
        ("\\boxed{x=2}", "2", True),
        ("\\boxed{\\text{(A)}}", "A", True),
        ("\\boxed{x^{10}}", "x^1", False),  # more than one character keeps its braces
        ("\\boxed{\\sqrt{12}}", "\\sqrt12", False),
        ("\\boxed{x==2}", "2", False),
        ("\\boxed{2}", "x=2", True),
        ("\\boxed{x = 0.5}", "\\frac12", True),
        ("\\boxed{x=2}", "x=2", True),
        ("\\boxed{x=2}", "y=2", False),  # a vertical line is not a horizontal one
        ("\\boxed{y=2x}", "x=2x", False),
        ("\\boxed{x=2.0}", "x=2", True),
        ("\\boxed{x=\\frac12}", "x=0.5", True),
        ("\\boxed{(AB)}", "AB", False),
        # a comma and a space separate list items; without the space, thousands
        ("\\boxed{10100}", "10, 100", False),
        ("\\boxed{10, 100}", "10100", False),
        ("\\boxed{4100}", "4, 100", False),
        ("\\boxed{10,100}", "10, 100", False),  # ten thousand one hundred, not two items
        ("\\boxed{10, 100}", "10,100", False),
        ("\\boxed{10100}", "10,100", True),
        ("\\boxed{1, 2, 3}", "1,2,3", True),  # not a number: the same items spaced otherwise
        ("\\boxed{0, 100}", "0,100", True),  # 0,100 is no number with separators: a list
        ("\\boxed{0,100}", "0, 100", True),
        ("\\boxed{0,125}", "125", False),
        ("\\boxed{3, 500}", "(3,500)", False),  # a point, not the list (normalised compare)
        ("\\boxed{-2, 1}", "-2,1", True),
        ("\\boxed{4,100}", "4100", True),
        ("\\boxed{1,000, 2,000}", "1000, 2000", True),  # lists item by item
        ("\\boxed{1,000, 2,500}", "1000, 2000", False),
        ("\\boxed{1,000, 2,000}", "1000, 2000, 3", False),
        ("\\boxed{\\frac12, 3}", "0.5, 3", True),
        ("\\boxed{1{,}000, 7}", "1000, 7", True),
        ("\\boxed{\\leftarrow}", "\\rightarrow", False),  # \left / \right only before a delimiter
        ("\\boxed{\\leftrightarrow}", "\\rightarrow", False),
        ("\\boxed{\\left( 1, 2 \\right]}", "(1,2]", True),
        ("\\boxed{\\left\\{1,2\\right\\}}", "\\{1,2\\}", True),
        ("First \\boxed{7}. Recompute: \\boxed{\\frac{49}{", "7", False),  # cut off
    ],
)
def test_check_answer_fallback(response, reference, ok):
    assert check_answer(response, reference, use_math_verify=False) is ok


def test_math_verify_flag():
    if math_verify_available():
        assert check_answer("\\boxed{\\frac{2}{4}}", "0.5", use_math_verify=True)
        assert not check_answer("\\boxed{3}", "4", use_math_verify=True)
    else:
        with pytest.raises(ImportError, match="math-verify"):
            check_answer("\\boxed{1}", "1", use_math_verify=True)
        # None falls back to the normalised comparison
        assert check_answer("\\boxed{1}", "1", use_math_verify=None)


def test_a_list_is_not_a_number_with_separators_even_where_math_verify_says_so(monkeypatch):
    """math-verify 0.9 equates '10, 100' with '10,100' (ten thousand one hundred): the check
    refuses that pair before asking it; anything else still goes to it."""
    from megatron_eaopd.data import answers

    asked = []
    monkeypatch.setattr(answers, "math_verify_available", lambda: True)
    monkeypatch.setattr(answers, "_math_verify", lambda ref, pred: asked.append(pred) or True)
    assert not check_answer("\\boxed{10, 100}", "10,100", use_math_verify=True)
    assert not check_answer("\\boxed{4,100}", "4, 100", use_math_verify=True)
    assert asked == []
    assert check_answer("\\boxed{\\pi}", "3.14159", use_math_verify=True) and asked == ["\\pi"]
    # the guard looks at the side without a spaced comma: a point (3,500) goes to math-verify
    assert check_answer("\\boxed{3, 500}", "(3,500)", use_math_verify=True)
    assert asked == ["\\pi", "3, 500"]


class _BoxedTask:
    """The default Task.check on one problem (the jsonl task uses it unchanged)."""

    @staticmethod
    def make(use_math_verify):
        from megatron_eaopd.data.task import Problem, Task

        class T(Task):
            def train_problems(self):
                return []

            def distill_problems(self):
                return []

            def eval_problems(self):
                return []

        task = T()
        task.use_math_verify = use_math_verify
        return task, Problem("p0", "2/4 = ?", "0.5")


@pytest.mark.parametrize("installed", [True, False])
@pytest.mark.parametrize("setting", [True, False, None])
def test_task_check_follows_use_math_verify(monkeypatch, setting, installed):
    """true: math-verify decides (here a stand-in that accepts everything); false: never asked;
    null: asked exactly when it is installed."""
    from megatron_eaopd.data import answers

    calls = []

    def fake_verify(reference, predicted):
        calls.append((reference, predicted))
        return True

    monkeypatch.setattr(answers, "math_verify_available", lambda: installed)
    monkeypatch.setattr(answers, "_math_verify", fake_verify)
    task, problem = _BoxedTask.make(setting)
    response = "\\boxed{0.75}"  # wrong: only the stand-in math-verify accepts it
    if setting is True and not installed:
        with pytest.raises(ImportError, match="math-verify"):
            task.check(response, problem)
        return
    used = setting is True or (setting is None and installed)
    assert task.check(response, problem) is used
    assert bool(calls) is used


def test_prepare_data_sets_and_checks_use_math_verify(tmp_path, monkeypatch):
    from pathlib import Path

    from megatron_eaopd.config import load_config
    from megatron_eaopd.data import TaskError, prepare, prepare_data

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
    base = [f"tokenizer.cache_dir={tmp_path / 'tok'}", "task.synthetic.num_train=200"]
    monkeypatch.setattr(prepare, "math_verify_available", lambda: False)
    with pytest.raises(TaskError, match="eval.use_math_verify=true needs the math-verify"):
        prepare_data(load_config(tiny, [*base, "eval.use_math_verify=true"]))
    for text, setting in (("false", False), ("null", None)):
        data = prepare_data(load_config(tiny, [*base, f"eval.use_math_verify={text}"]))
        assert data.task.use_math_verify is setting


def test_default_explain_reads_the_boxed_answer():
    """The default Task.explain: None exactly when check accepts; else no answer, wrong answer
    (by the default answer check, so the same value written otherwise is not "wrong") or
    rejected (a task whose own check also wants the word "because")."""
    task, problem = _BoxedTask.make(False)  # reference 0.5
    assert task.explain("so \\boxed{0.5}", problem) is None
    assert task.explain("half", problem) == "no answer: no \\boxed{}"
    assert task.explain("\\boxed{6}", problem) == "wrong answer: '6', expected '0.5'"

    class Strict(type(task)):
        def check(self, response, problem):
            return "because" in response and super().check(response, problem)

    strict = Strict()
    strict.use_math_verify = False
    assert strict.explain("\\boxed{0.5}", problem).startswith("rejected:")
    assert strict.explain("\\boxed{1/2}", problem).startswith("rejected:")  # the same value
    assert strict.explain("\\boxed{6}", problem).startswith("wrong answer:")
    assert strict.explain("because \\boxed{0.5}", problem) is None
