"""Final-answer extraction from ``\\boxed{...}`` and answer checking.

:func:`check_answer` uses the optional ``math-verify`` package (``pip install
megatron-eaopd[math]``) when it is installed and asked for, and otherwise a normalised comparison:
strings are normalised (spaces, ``$``, ``\\left``/``\\right`` before a delimiter, ``\\dfrac``,
``^\\circ``, text wrappers, a trailing period, braces around one character after ``^``, ``_`` or
``\\sqrt``, a leading ``x=`` where the other side has none or the same, parentheses around a
one-letter choice) and compared; when both sides read as numbers (integers, decimals, ``a/b``,
``\\frac{a}{b}``, thousands separators, percentages) they are compared as exact fractions. A
comma followed by a space separates list items (``10, 100`` is neither 10100 nor ``10,100``, also
under math-verify); two lists match item by item, in order. With math-verify, an answer is
right when math-verify or the normalised comparison accepts it.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

__all__ = [
    "check_answer",
    "extract_boxed",
    "math_verify_available",
    "normalize_answer",
    "parse_number",
]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Return the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; ``\\boxed 5`` (no
    braces) gives ``5``. Returns None when there is no box, or when the last one is not complete
    (a response cut off inside its final box has no final answer: an earlier box it went on to
    revise does not count).
    """
    starts = [(text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS]
    start, cmd = max(starts)
    if start == -1:
        return None
    content = _box_content(text, start + len(cmd))
    return None if content is None else content.strip()


def _box_content(text: str, i: int) -> str | None:
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])  # "\boxed 5"
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")


# one character in braces after ^, _ or \sqrt: LaTeX typesets x^{2} and x^2 alike
_ONE_CHAR_GROUP = re.compile(r"(\^|_|\\sqrt)\{(\w)\}")
# a leading assignment to one variable (x=2); dropped only where the other side has no "="
_ASSIGNED = re.compile(r"^[A-Za-z]=(?=[^=])")
_CHOICE = re.compile(r"\(([A-Za-z])\)")
# \left / \right before their delimiter, not the start of \leftarrow or \rightarrow
_SIZING = re.compile(r"\\(?:left|right)(?![A-Za-z])")
# a comma followed by a space separates list items (10, 100), never thousands (10,100)
_LIST_COMMA = re.compile(r",\s")
# a number with thousands separators (1,000 or -12,345.5)
_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(,\d{3})+(\.\d+)?")  # 0,125 is not 125


def normalize_answer(answer: str) -> str:
    """Normalise an answer string for comparison (see the module docstring)."""
    s = str(answer).strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = _SIZING.sub("", s)  # \left( -> (, but \leftarrow stays
    for old, new in (
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\$", ""),
        ("$", ""),
    ):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if s.startswith("{") and s.endswith("}") and _box_content(s, 0) == s[1:-1]:
        s = s[1:-1]
    s = _ONE_CHAR_GROUP.sub(r"\1\2", s)  # x^{2} -> x^2, \sqrt{3} -> \sqrt3 (the same in LaTeX)
    m = _CHOICE.fullmatch(s)  # (B) -> B
    return m.group(1) if m else s


# \frac{12}{3}, or without braces one digit each (LaTeX's \frac123 is 1/2 followed by 3)
_FRAC = re.compile(r"^(-?)\\frac(?:\{(-?\d+)\}|(\d))(?:\{(-?\d+)\}|(\d))$")
_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


# Longest number text and largest decimal exponent read as numbers: a model that loops on
# digits (or writes 1e999999999) must get a wrong answer, not a conversion that raises (Python
# refuses int() of more than 4300 digits) or takes minutes.
MAX_NUMBER_CHARS = 4000
MAX_EXPONENT = 1000


def parse_number(answer: str, separators: bool = True) -> Fraction | None:
    """Read a normalised answer as an exact number, or None when it is not one (also when it
    is longer than MAX_NUMBER_CHARS or its exponent exceeds MAX_EXPONENT). ``separators``: read
    commas between groups of three digits as thousands separators (1,000); :func:`check_answer`
    turns it off for an answer whose text has a comma followed by a space (a list: 10, 100)."""
    s = normalize_answer(answer)
    percent = s.endswith("\\%") or s.endswith("%")
    s = s.removesuffix("\\%").removesuffix("%")
    if len(s) > 2 * MAX_NUMBER_CHARS:  # a cheap bound before the regular expressions
        return None
    s = s.replace("{,}", ",")  # LaTeX's thousands separator: 1{,}000
    if separators and _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if len(s) > MAX_NUMBER_CHARS:
        return None
    value: Fraction | None = None
    m = _FRAC.match(s)
    if m:
        sign, num_braced, num_digit, den_braced, den_digit = m.groups()
        num, den = num_braced or num_digit, den_braced or den_digit
        if int(den) != 0:
            value = Fraction(int(num), int(den)) * (-1 if sign else 1)
    elif re.fullmatch(r"-?\d+/-?\d+", s):
        num, den = s.split("/")
        if int(den) != 0:
            value = Fraction(int(num), int(den))
    elif _NUM.match(s):
        exponent = re.search(r"[eE]([-+]?\d+)$", s)
        if exponent and abs(int(exponent.group(1))) > MAX_EXPONENT:
            return None
        value = Fraction(s)
    if value is not None and percent:
        value /= 100
    return value


@functools.lru_cache(maxsize=1)
def math_verify_available() -> bool:
    """Whether the optional ``math-verify`` package can be imported."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _math_verify(reference: str, predicted: str) -> bool:
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}")
    pred = parse(f"\\boxed{{{predicted}}}")
    return bool(gold) and bool(pred) and bool(verify(gold, pred))


def check_answer(response: str, reference: str, use_math_verify: bool | None = None) -> bool:
    """Whether the last ``\\boxed{}`` answer in ``response`` equals ``reference``.

    Args:
        response: model output; only its last boxed answer counts (no box: wrong).
        reference: the gold answer (plain, or itself boxed).
        use_math_verify: True: use math-verify (error when missing); None: use it when installed;
            False: the normalised string/number comparison only.
    """
    predicted = extract_boxed(response)
    if predicted is None:
        return False
    reference = str(reference)
    ref_box = extract_boxed(reference)
    if ref_box is not None:
        reference = ref_box
    a, b = normalize_answer(predicted), normalize_answer(reference)
    listed = [bool(_LIST_COMMA.search(x)) for x in (predicted, reference)]
    unlisted = b if listed[0] else a  # the side written without a spaced comma
    if listed[0] != listed[1] and _THOUSANDS.fullmatch(unlisted.replace("{,}", ",")):
        return False  # 10, 100 (two items) against 10,100 (ten thousand one hundred): math-verify
    if use_math_verify is None:  # equates them too
        use_math_verify = math_verify_available()
    if use_math_verify:
        if not math_verify_available():
            raise ImportError("use_math_verify=True needs `pip install math-verify`")
        try:
            if _math_verify(reference, predicted):
                return True
        except Exception:  # math-verify can fail to parse odd strings; fall back below
            pass
    left = [m.group(0) if m else None for m in (_ASSIGNED.match(a), _ASSIGNED.match(b))]
    # x=2 against 2 or x=2.0, never x=2 against y=2
    if "=" not in a or "=" not in b or (left[0] is not None and left[0] == left[1]):
        a, b = _ASSIGNED.sub("", a), _ASSIGNED.sub("", b)
    if a == b:
        return True
    if listed[0] and listed[1]:  # item by item: 1,000, 2,000 against 1000, 2000
        items = [_LIST_COMMA.split(x.strip()) for x in (predicted, reference)]
        if len(items[0]) == len(items[1]) and all(map(_same_item, *items)):
            return True
    na = parse_number(a, separators=not listed[0])
    nb = parse_number(b, separators=not listed[1])
    return na is not None and nb is not None and na == nb


def _same_item(predicted: str, reference: str) -> bool:
    """Whether two items of a listed answer are the same text or number once normalised."""
    if normalize_answer(predicted) == normalize_answer(reference):
        return True
    a, b = parse_number(predicted), parse_number(reference)
    return a is not None and a == b
