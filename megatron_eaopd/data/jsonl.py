"""Tasks given as prompt files (JSONL, or Parquet when pyarrow is installed): no code needed.

Each line of a ``.jsonl`` file is one JSON object (format in docs/tasks.md)::

    {"id": "math-17", "prompt": "What is 2+3?", "answer": "5", "solutions": ["2+3=5 \\\\boxed{5}"]}

``prompt`` (non-empty string) and ``answer`` (non-empty string or finite number) are required;
``id`` (string or whole number; default, also for null: ``<file stem>-<line>``), ``solutions`` (list
of strings) or ``solution`` (string) are optional; any other key is kept in
:attr:`Problem.meta`. Blank lines are skipped; the file is UTF-8 (a byte-order mark is skipped).
"""

from __future__ import annotations

import codecs
import decimal
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_eaopd.data.task import Problem, Task, TaskError

__all__ = ["JsonlTask", "read_prompt_file"]


def _records(path: Path) -> list[tuple[int, Any]]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise TaskError(f"{path}: reading Parquet needs `pip install pyarrow`") from err
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a byte-order mark is skipped
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = len(re.findall(rb"\r\n|\r|\n", data[: err.start])) + 1
        raise TaskError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}; a compressed or "
            "otherwise encoded file?): save it as UTF-8 JSON Lines"
        ) from err
    out = []
    # lines as a text-mode file splits them (\n, \r\n, \r), not str.splitlines (\u2028 ...)
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            hint = ""
            if line.strip() in ("[", "{") or text.lstrip().startswith("["):
                hint = (": the file must hold one JSON object per line (JSON Lines), not a JSON "
                        "array or an object spread over lines")  # fmt: skip
            raise TaskError(
                f"{path}:{lineno}: malformed JSON ({err.msg}, column {err.colno}){hint}"
            ) from err
        except ValueError as err:  # e.g. an integer of more than 4300 digits
            raise TaskError(f"{path}:{lineno}: unreadable JSON value ({err})") from err
    return out


def _encodable(text: str) -> bool:
    """False for text with lone surrogates (JSON escapes like \\ud83d without their pair),
    which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: What JSON makes of a LaTeX command written with one backslash: its valid escapes \b \f \n \r
#: \t turn ``\boxed`` into a backspace + "oxed", ``\frac`` into a form feed + "rac", ``\theta`` into
#: a tab + "heta". A backspace before a letter, or a form feed before the rest of a command that
#: starts with f, is never meant: refused. A tab, newline or carriage return before what would
#: complete a common command, or a form feed before another letter (a page break), may be meant
#: (code, tables, extracted text): warned about, except in an answer, where it is refused.
_ESCAPE_SURE = re.compile(r"\x08[A-Za-z]|\x0c(?:rac|orall|box|lat|rown|ootnote)(?![A-Za-z])")
_ESCAPE_LIKELY = re.compile(
    r"\x0c[A-Za-z]"
    r"|\t(?:heta|imes|ext(?:bf|it|rm)?|frac|au|herefore|o|riangle|ilde)(?![A-Za-z])"
    # \tan x, \tan(x), \tan^2: not a table cell's "an item"
    r"|\tanh?(?=[(\\^{_$}]| ?[A-Za-z0-9](?![A-Za-z])|$)"
    r"|\n(?:eq?|abla|otin|ot|eg|u|leq|geq|mid|cong|ewline)(?![A-Za-z])"
    r"|\ni(?![A-Za-z).])"  # \ni, not an enumeration's "i)" or "i."
    r"|\r(?:ho|ight(?:arrow)?|angle|ceil|floor)(?![A-Za-z])"
)
_ESCAPE_OF = {"\x08": "b", "\x0c": "f", "\r": "r", "\t": "t", "\n": "n"}


def _escape_slip(key: str, text: str, pattern: re.Pattern) -> str | None:
    """Where ``text`` looks like LaTeX whose backslash JSON read as an escape (None if not):
    names the escape and the command it ate."""
    m = pattern.search(text)
    if m is None:
        return None
    char = m.group(0)[0]
    letter = _ESCAPE_OF[char]
    tail = re.match(r"[A-Za-z]*", text[m.start() + 1 :]).group(0)
    return (
        f"{key!r} holds {char!r} where the file has `\\{letter}{tail}`? JSON reads `\\{letter}` "
        f"as a control character, so LaTeX such as `\\{letter}{tail}` must be written with a "
        f"doubled backslash in the file (`\\\\{letter}{tail}`; json.dumps does this)"
    )


def _answer(value: Any) -> str | None:
    """The answer as text, or None when it is not a non-empty string or a finite number
    (int, float, or Parquet's decimal)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
        return None
    if not math.isfinite(value):
        return None
    return str(value)


def _uid(value: Any, default: str) -> str | None:
    """The id as text (None/null: ``default``); None when it is not a non-empty string or a
    whole number (pandas writes integer ids as 1.0 when the column has a gap)."""
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        return None
    return str(value)


def read_prompt_file(
    path: str | os.PathLike, prompt_suffix: str = "", require_solutions: bool = False
) -> list[Problem]:
    """Read a prompt file into problems.

    Args:
        path: a ``.jsonl`` file (or ``.parquet`` with pyarrow installed).
        prompt_suffix: appended to every prompt verbatim.
        require_solutions: every record must carry at least one solution (teacher preparation).

    Raises:
        TaskError: missing file, malformed line, missing/mistyped field, a LaTeX backslash that
            JSON read as an escape (``\\frac`` written ``\frac``), duplicate id, or no records;
            the message names the file and line.
    """
    p = Path(path)
    if p.is_dir():
        raise TaskError(f"{p} is a directory, not a prompt file (.jsonl or .parquet)")
    if not p.is_file():
        raise TaskError(f"prompt file not found: {p}")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    suspects: list[tuple[int, str]] = []  # (line, why): text that may be a LaTeX escape slip
    for lineno, rec in _records(p):
        where = f"{p}:{lineno}"
        if not isinstance(rec, dict):
            hint = ""
            if isinstance(rec, list):  # [{...}, {...}] on one line: a JSON array
                hint = (
                    ": the file must hold one JSON object per line (JSON Lines), not a JSON array"
                )
            raise TaskError(f"{where}: expected a JSON object, got {type(rec).__name__}{hint}")
        for key in ("prompt", "answer"):
            if key not in rec:
                keys = ", ".join(map(repr, rec)) or "none"
                raise TaskError(f"{where}: no {key!r} key (this line has: {keys})")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskError(f"{where}: 'prompt' must be a non-empty string")
        answer = _answer(rec.get("answer"))
        if answer is None:
            raise TaskError(
                f"{where}: 'answer' must be a non-empty string or a finite number, got "
                f"{rec.get('answer')!r}"
            )
        sols_in = rec.get("solutions", rec.get("solution", []))
        texts = [("prompt", prompt), ("answer", answer)]
        texts += [("solutions", t) for t in (sols_in if isinstance(sols_in, list) else [sols_in])
                  if isinstance(t, str)]  # fmt: skip
        for key, text in texts:
            if not _encodable(text):
                raise TaskError(f"{where}: {key!r} holds an invalid character (a lone surrogate)")
            if p.suffix.lower() == ".parquet":
                continue
            slip = _escape_slip(key, text, _ESCAPE_SURE)
            likely = _escape_slip(key, text, _ESCAPE_LIKELY)
            if slip is None and key == "answer":  # a reference answer holds no such layout
                slip = likely
            if slip is not None:
                raise TaskError(f"{where}: {slip}")
            if likely is not None:
                suspects.append((lineno, likely))
        sols = rec.get("solutions", rec.get("solution", []))
        if isinstance(sols, str):
            sols = [sols]
        if not isinstance(sols, list) or not all(isinstance(s, str) for s in sols):
            raise TaskError(f"{where}: 'solutions' must be a list of strings")
        if require_solutions and not sols:
            raise TaskError(f"{where}: a training prompt needs 'solutions' (or 'solution')")
        uid = _uid(rec.get("id"), f"{p.stem}-{lineno}")
        if uid is None:
            raise TaskError(
                f"{where}: 'id' must be a non-empty string or a whole number, got {rec['id']!r}"
            )
        if uid in seen:
            if rec.get("id") is None:  # the default id of this line repeats an explicit one
                raise TaskError(
                    f"{where}: this line has no 'id', and its default id {uid!r} (file stem - "
                    f"line) is the explicit id of line {seen[uid]}: give line {seen[uid]} "
                    "another id, or give every line one"
                )
            raise TaskError(f"{where}: duplicate id {uid!r} (first on line {seen[uid]})")
        seen[uid] = lineno
        meta = {
            k: v
            for k, v in rec.items()
            if k not in ("id", "prompt", "answer", "solutions", "solution")
        }
        problems.append(Problem(uid, prompt + prompt_suffix, answer, tuple(sols), meta))
    if not problems:
        raise TaskError(f"{p}: no prompts (the file is empty)")
    if suspects:
        line, why = suspects[0]
        logging.getLogger(__name__).warning(
            "%s: %d line(s) hold a tab, newline, carriage return or form feed just before what "
            "may be a LaTeX command whose backslash JSON read as an escape (first, line %d: %s). "
            "Ignore this if they are meant (code, tables, page breaks)",
            p, len({n for n, _ in suspects}), line, why,
        )  # fmt: skip
    return problems


class JsonlTask(Task):
    """A task read from prompt files.

    Args:
        distill_file: distillation prompts (required).
        train_file: prompts with solutions for teacher preparation (optional).
        eval_files: held-out sets, each named by its file stem (optional; may be a single path).
        prompt_suffix: appended to every prompt.
    """

    name = "jsonl"

    def __init__(
        self,
        distill_file: str | os.PathLike,
        train_file: str | os.PathLike | None = None,
        eval_files: Sequence[str | os.PathLike] | str | None = None,
        prompt_suffix: str = "",
    ):
        if isinstance(eval_files, str | os.PathLike):
            eval_files = [eval_files]
        self._train_file = train_file
        self._suffix = prompt_suffix
        self._distill = read_prompt_file(distill_file, prompt_suffix)
        self._train: list[Problem] | None = None
        self._eval: dict[str, list[Problem]] = {}
        for f in eval_files or []:
            stem = Path(f).stem
            if stem in self._eval:
                raise TaskError(f"two eval files share the name {stem!r}: rename one")
            if stem == "mean":  # the metrics' "mean/..." keys average over the sets
                raise TaskError(f"eval file {f}: the set name 'mean' is reserved: rename the file")
            self._eval[stem] = read_prompt_file(f, prompt_suffix)

    @classmethod
    def from_config(cls, task_cfg: Any) -> JsonlTask:
        """Build from a :class:`~megatron_eaopd.config.TaskConfig`."""
        if not task_cfg.distill_file:
            raise TaskError("task.distill_file is not set (task.name=jsonl needs it)")
        return cls(
            task_cfg.distill_file, task_cfg.train_file, task_cfg.eval_files, task_cfg.prompt_suffix
        )

    def train_problems(self) -> Sequence[Problem]:
        """Problems of ``train_file`` (each with solutions); TaskError when it is not set."""
        if self._train is None:
            if self._train_file is None:
                raise TaskError("task.train_file is not set; teacher preparation needs it")
            self._train = read_prompt_file(self._train_file, self._suffix, require_solutions=True)
        return self._train

    def distill_problems(self) -> Sequence[Problem]:
        """Problems of ``distill_file``."""
        return self._distill

    def eval_problems(self) -> Sequence[Problem]:
        """All eval sets concatenated (empty when no eval files are given)."""
        return [p for probs in self._eval.values() for p in probs]

    def eval_sets(self) -> Mapping[str, Sequence[Problem]]:
        """One set per eval file, named by the file stem."""
        return dict(self._eval)

    def corpus(self):
        """Prompts (and solutions when a training file is set)."""
        if self._train_file is not None:
            for p in self.train_problems():
                yield p.prompt
                yield from p.solutions
        for p in (*self._distill, *self.eval_problems()):
            yield p.prompt
