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
        ("\\boxed{3} and then \\boxed{4", "3"),
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
        ("\\boxed{ 12 }", "12", True),
        ("\\boxed{12.}", "12", True),
        ("\\boxed{\\text{(B)}}", "(B)", True),
        ("\\boxed{x^2 + 1}", "x^2+1", True),
        ("\\boxed{90^\\circ}", "90", True),
        ("\\boxed{13}", "12", False),
        ("12", "12", False),
        ("\\boxed{0.3333}", "\\frac{1}{3}", False),
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
