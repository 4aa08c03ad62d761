"""Task loading: JSONL prompt files, dotted module:Class tasks, prompt-length checks."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from megatron_eaopd.config import TaskConfig, load_config
from megatron_eaopd.data import (
    JsonlTask,
    Problem,
    SyntheticArithmeticTask,
    Task,
    TaskError,
    load_task,
    read_prompt_file,
    validate_prompt_lengths,
)


class ToyTask(Task):
    """A minimal task used through its dotted path ``tests.data.test_tasks:ToyTask``."""

    name = "toy"

    def __init__(self, n: int = 3, word: str = "x"):
        self.items = [
            Problem(f"toy-{i}", f"{word} {i}?", str(i), (f"\\boxed{{{i}}}",)) for i in range(n)
        ]

    def train_problems(self) -> Sequence[Problem]:
        return self.items

    def distill_problems(self) -> Sequence[Problem]:
        return self.items

    def eval_problems(self) -> Sequence[Problem]:
        return self.items[:1]


class NotATask:
    def __init__(self, **kwargs):
        pass


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_task_reads_all_fields(tmp_path):
    train = _jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "1+1?", "answer": 2, "solutions": ["1+1=2 \\boxed{2}", "\\boxed{2}"]},
            {"id": "q7", "prompt": "2+2?", "answer": "4", "solution": "\\boxed{4}", "level": 3},
        ],
    )
    distill = _jsonl(tmp_path / "distill.jsonl", [{"prompt": "3+3?", "answer": "6"}, ""])
    ev1 = _jsonl(tmp_path / "math500.jsonl", [{"prompt": "1/2 + 1/2?", "answer": "1"}])
    ev2 = _jsonl(tmp_path / "aime.jsonl", [{"prompt": "x?", "answer": "\\frac{1}{2}"}])
    cfg = TaskConfig(
        name="jsonl",
        train_file=str(train),
        distill_file=str(distill),
        eval_files=[str(ev1), str(ev2)],
        prompt_suffix=" Box it.",
    )
    task = load_task(cfg)
    assert isinstance(task, JsonlTask)
    tr = task.train_problems()
    assert [p.uid for p in tr] == ["train-1", "q7"]
    assert tr[0].answer == "2" and tr[0].prompt == "1+1? Box it."
    assert tr[0].solutions == ("1+1=2 \\boxed{2}", "\\boxed{2}")
    assert tr[1].solutions == ("\\boxed{4}",) and tr[1].meta == {"level": 3}
    assert [p.prompt for p in task.distill_problems()] == ["3+3? Box it."]
    assert list(task.eval_sets()) == ["math500", "aime"]
    assert len(task.eval_problems()) == 2
    aime = task.eval_sets()["aime"][0]
    assert task.check("so \\boxed{0.5}", aime) and not task.check("\\boxed{0.6}", aime)
    corpus = list(task.corpus())
    assert "1+1=2 \\boxed{2}" in corpus and "3+3? Box it." in corpus


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            ['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": '],
            r"bad\.jsonl:2: malformed JSON",
        ),
        ([{"answer": 1}], r"bad\.jsonl:1: no 'prompt' key \(this line has: 'answer'\)"),
        ([{"prompt": None, "answer": 1}], r"bad\.jsonl:1: 'prompt' must be a non-empty string"),
        ([{"prompt": "  ", "answer": 1}], "non-empty"),
        (
            [{"prompt": "a", "Answer": 1}],
            r"bad\.jsonl:1: no 'answer' key \(this line has: "
            r"'prompt', 'Answer'\)",
        ),
        ([{"prompt": "a", "answer": None}], r"bad\.jsonl:1: 'answer' must be"),
        ([{"prompt": "a", "answer": [1]}], "'answer' must be"),
        ([{"prompt": "a", "answer": 1, "solutions": [1]}], "'solutions' must be a list of strings"),
        (["[1, 2]"], "expected a JSON object"),
        (
            ['[{"prompt": "a", "answer": 1}]'],
            r"got list: the file must hold one JSON object per "
            r"line \(JSON Lines\), not a JSON array",
        ),
        (
            [{"id": 1, "prompt": "a", "answer": 1}, {"id": 1, "prompt": "b", "answer": 2}],
            "duplicate id '1'",
        ),
        ([], "no prompts"),
        ([""], "no prompts"),
        # answers that would score as right or wrong by accident
        ([{"prompt": "a", "answer": ""}], r"'answer' must be a non-empty string or a finite"),
        ([{"prompt": "a", "answer": "  "}], "'answer' must be"),
        ([{"prompt": "a", "answer": True}], "'answer' must be"),
        (['{"prompt": "a", "answer": NaN}'], "'answer' must be"),
        (['{"prompt": "a", "answer": 1e400}'], "'answer' must be"),
        ([{"id": "", "prompt": "a", "answer": 1}], r"bad\.jsonl:1: 'id' must be a non-empty"),
        ([{"id": [1], "prompt": "a", "answer": 1}], "'id' must be"),
        (['{"prompt": "a \\ud83d.", "answer": 1}'], r"bad\.jsonl:1: 'prompt' holds an invalid"),
        (['{"prompt": "a", "answer": 1, "solutions": ["\\ud83d"]}'], "'solutions' holds an"),
        ([{"id": 1.5, "prompt": "a", "answer": 1}], "'id' must be a non-empty string or a whole"),
        (['{"prompt": "a", "answer": ' + "9" * 5000 + "}"], r"bad\.jsonl:1: unreadable JSON"),
        # LaTeX written with one backslash: JSON reads \f and \b as control characters
        (
            [r'{"prompt": "a", "answer": "\frac{5}{6}"}'],
            r"bad\.jsonl:1: 'answer' holds '\\x0c' where the file has `\\frac`\?",
        ),
        ([r'{"prompt": "put it in \boxed{}", "answer": 1}'], r"'prompt' holds '\\x08'.*`\\boxed`"),
        ([r'{"prompt": "a", "answer": 1, "solutions": ["\frac12"]}'], "'solutions' holds"),
        # in a reference answer a tab or newline before a command's rest is refused as well: it
        # could never be scored correct
        ([r'{"prompt": "a", "answer": "\text{(C)}"}'], r"'answer' holds '\\t'.*`\\text`"),
        ([r'{"prompt": "a", "answer": "\neq"}'], r"'answer' holds '\\n'.*`\\neq`"),
        (["[", '{"prompt": "a", "answer": 1}', "]"], r":1: malformed JSON .*one JSON object per"),
        (
            [
                {"id": "bad-3", "prompt": "a", "answer": 1},
                {"prompt": "b", "answer": 2},
                {"prompt": "c", "answer": 3},
            ],
            r"bad\.jsonl:3: this line has no 'id', and its default id 'bad-3'.* line 1",
        ),
    ],
)
def test_malformed_prompt_files(tmp_path, rows, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=message):
        read_prompt_file(path)


def test_escapes_that_are_meant_pass(tmp_path):
    """Newlines and tabs as text uses them, and LaTeX with doubled backslashes (json.dumps),
    are read as written: the one-backslash check refuses only what completes a command."""
    rows = [
        {"prompt": "Line one\nnot here\n\nthe\ttable\ttext", "answer": "x=1\ny=2"},
        {"prompt": "Compute $\\frac{1}{2} \\times \\theta$ \\neq \\boxed{}", "answer": "\\frac12"},
    ]
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_prompt_file(path)
    assert [(p.prompt, p.answer) for p in got] == [(r["prompt"], r["answer"]) for r in rows]
    assert got[1].prompt.startswith("Compute $\\frac{1}{2}")


def test_tabs_and_newlines_that_may_be_latex_escapes_are_warned_about(tmp_path, caplog):
    """\\theta, \\neq, \\rightarrow written with one backslash load as a tab, newline or carriage
    return before the rest of the command; code and tables can hold the same text, so these load
    with one warning per file naming the first line (a backspace or form feed is refused)."""
    rows = [
        r'{"prompt": "plain", "answer": 1}',
        r'{"prompt": "angle \theta", "answer": 1}',
        r'{"prompt": "a \neq b", "answer": 1, "solutions": ["x \rightarrow y"]}',
    ]
    path = tmp_path / "latex.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        got = read_prompt_file(path)
    assert got[1].prompt == "angle \theta"  # loaded as JSON reads it: a tab
    text = caplog.text
    assert f"{path}: 2 line(s) hold a tab, newline, carriage return or form feed" in text
    assert "(first, line 2: 'prompt' holds '\\t' where the file has `\\theta`?" in text
    caplog.clear()
    pages = tmp_path / "pages.jsonl"  # a page break, as pdftotext writes it: loads, warned about
    pages.write_text(json.dumps({"prompt": "Page 3.\fChapter 4: find x", "answer": 1}) + "\n")
    with caplog.at_level("WARNING"):
        assert read_prompt_file(pages)[0].prompt == "Page 3.\fChapter 4: find x"
    assert "1 line(s)" in caplog.text
    caplog.clear()
    for text in (r"$\tan x$", r"\tan(x)", r"a \ni b", r"$\tan$"):  # \tan, \ni: warned about
        one = tmp_path / "one.jsonl"
        one.write_text(f'{{"prompt": "{text}", "answer": 1}}\n')
        with caplog.at_level("WARNING"):
            read_prompt_file(one)
        assert "1 line(s)" in caplog.text, text
        caplog.clear()
    code = tmp_path / "code.jsonl"  # code, a table cell, enumerations: no warning
    code.write_text(json.dumps({"prompt": "for i in x:\n\tprint(i)", "answer": 1}) + "\n"
                    + json.dumps({"prompt": "item\tan item\ni) one\nii) two", "answer": 1})
                    + "\n")  # fmt: skip
    with caplog.at_level("WARNING"):
        read_prompt_file(code)
    assert caplog.text == ""


def test_encodings_directories_and_reserved_names(tmp_path):
    """Not UTF-8 (Latin-1, gzip): an error naming the file and line; a byte-order mark and an
    upper-case .JSONL are read; null ids take the default; a directory and an eval set named
    'mean' (the average's key) are refused."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "answer": 1}\n{"prompt": "caf\xe9", "answer": 1}\n')
    with pytest.raises(TaskError, match=r"latin\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_prompt_file(latin)
    gz = tmp_path / "g.jsonl"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
    with pytest.raises(TaskError, match=r"g\.jsonl:1: not UTF-8 text \(byte 0x8b"):
        read_prompt_file(gz)
    # after a byte-order mark, and with \r line ends: still the line and byte of the bad one
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": 1}\r\r{"prompt": "\xe9", "answer": 1}')
    with pytest.raises(TaskError, match=r"cr\.jsonl:3: not UTF-8 text \(byte 0xe9"):
        read_prompt_file(cr)
    bom = tmp_path / "BOM.JSONL"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": 1}\r\n{"id": null, "prompt": "b", '
                    b'"answer": "x"}\r\n{"id": 7.0, "prompt": "c", "answer": 2.5}')  # fmt: skip
    problems = read_prompt_file(bom)
    assert [(q.uid, q.prompt, q.answer) for q in problems] == [
        ("BOM-1", "a", "1"), ("BOM-2", "b", "x"), ("7", "c", "2.5")]  # fmt: skip
    with pytest.raises(TaskError, match="is a directory, not a prompt file"):
        read_prompt_file(tmp_path)
    distill = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": 1}])
    mean = _jsonl(tmp_path / "mean.jsonl", [{"prompt": "a", "answer": 1}])
    with pytest.raises(TaskError, match="the set name 'mean' is reserved"):
        load_task(TaskConfig(name="jsonl", distill_file=str(distill), eval_files=[str(mean)]))


def test_missing_files_and_settings(tmp_path):
    with pytest.raises(TaskError, match="not found: .*nope.jsonl"):
        load_task(TaskConfig(name="jsonl", distill_file=str(tmp_path / "nope.jsonl")))
    with pytest.raises(TaskError, match="distill_file is not set"):
        load_task(TaskConfig(name="jsonl"))
    distill = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": 1}])
    task = load_task(TaskConfig(name="jsonl", distill_file=str(distill)))
    with pytest.raises(TaskError, match="train_file is not set"):
        task.train_problems()
    nosol = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": 1}])
    task = load_task(TaskConfig(name="jsonl", distill_file=str(distill), train_file=str(nosol)))
    with pytest.raises(TaskError, match="t.jsonl:1: a training prompt needs 'solutions'"):
        task.train_problems()


def test_dotted_task_path():
    task = load_task(
        TaskConfig(name="tests.data.test_tasks:ToyTask", options={"n": 5, "word": "q"})
    )
    assert isinstance(task, ToyTask) and len(task.distill_problems()) == 5
    assert task.distill_problems()[2].prompt == "q 2?"
    assert dict(task.eval_sets()) == {"eval": task.eval_problems()}
    assert task.check("\\boxed{0}", task.eval_problems()[0])
    with pytest.raises(TaskError, match="cannot build it from task.options"):
        load_task(TaskConfig(name="tests.data.test_tasks:ToyTask", options={"bogus": 1}))
    with pytest.raises(TaskError, match="cannot import module 'no_such_mod'"):
        load_task(TaskConfig(name="no_such_mod:Task"))
    with pytest.raises(TaskError, match="has no 'Missing'"):
        load_task(TaskConfig(name="tests.data.test_tasks:Missing"))
    with pytest.raises(TaskError, match="is not a Task"):
        load_task(TaskConfig(name="tests.data.test_tasks:NotATask"))
    with pytest.raises(TaskError, match="expected 'package.module:ClassName'"):
        load_task(TaskConfig(name="tests.data.test_tasks"))


def test_builtin_from_config():
    cfg = load_config(
        None,
        [
            "task.synthetic.num_train=20",
            "task.synthetic.num_distill=10",
            "task.synthetic.num_eval=5",
            "task.synthetic.seed=9",
            "rollout.prompts_per_iteration=8",
            "rollout.mini_batch_size=8",
        ],
    )
    task = load_task(cfg.task)
    assert isinstance(task, SyntheticArithmeticTask)
    assert (
        task.distill_problems()
        == SyntheticArithmeticTask(
            seed=9, num_train=20, num_distill=10, num_eval=5
        ).distill_problems()
    )


def test_prompt_length_limit_and_empty_set():
    problems = [Problem("a", "one two", "1"), Problem("b", "one two three four five", "2")]
    encode = str.split  # a whitespace "tokenizer" makes the lengths obvious
    assert validate_prompt_lengths(problems, encode, 5) == 5
    with pytest.raises(TaskError, match=r"1 of 2 prompts .*max_prompt_tokens=4 .*'b', 5 tokens"):
        validate_prompt_lengths(problems, encode, 4)
    with pytest.raises(TaskError, match="empty"):
        validate_prompt_lengths([], encode, 4)
    # a tokenizer without BOS may encode a prompt to nothing: named before any compute
    blank = [Problem("a", "one", "1"), Problem("zw", " ", "2")]
    with pytest.raises(TaskError, match=r"'zw' encodes to no token"):
        validate_prompt_lengths(blank, str.split, 4)
