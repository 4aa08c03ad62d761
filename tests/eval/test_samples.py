"""Saved evaluation samples: the records the trainer writes and the table of mistakes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_eaopd.data.countdown import CountdownTask, sample_countdown_solution
from megatron_eaopd.eval.samples import count_mistakes, mistake_table, read_samples
from megatron_eaopd.trainer.evaluate import check_responses, sample_records, write_samples


class _Chars:
    """A character-level stand-in tokenizer (decode joins the characters)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class _Rollouts:
    def __init__(self, texts):
        self.texts = texts
        self.response_lens = [len(t) for t in texts]

    def response_ids(self, i):
        return [ord(c) for c in self.texts[i]]


def _responses(task, problems, k, rng):
    """k responses per problem: valid solutions, a disallowed size, a wrong subtraction, a cut."""
    texts = []
    for p in problems:
        start, steps = task.problem_of(p)
        for j in range(k):
            good = sample_countdown_solution(start, steps, rng)
            bad_size = next(s for s in range(2, 10) if s not in steps and s <= start)
            texts.append(
                [good, f"-{bad_size}={start - bad_size};", f"-1={start};", good[:-1]][j % 4]
            )
    return texts


@pytest.fixture()
def written(tmp_path, monkeypatch):
    import megatron_eaopd.trainer.evaluate as evaluate

    monkeypatch.setattr(evaluate, "decode", lambda tok, ids: tok.decode(ids))
    task = CountdownTask(seed=3, num_train=40, num_distill=20, num_eval=10)
    data = SimpleNamespace(tokenizer=_Chars(), task=task)
    problems = list(task.eval_problems())[:5]
    k, rng = 4, random.Random(0)
    rollouts = _Rollouts(_responses(task, problems, k, rng))
    rows = check_responses(task, data.tokenizer, problems, rollouts, k)
    # as replica 1 of 2 holds them: its i-th problem is the set's problem 1 + 2 i; keep 3 of 5
    records = sample_records(data, "eval", problems, rollouts, rows, [2, 0, 4], 1, 2, k)
    path = write_samples(str(tmp_path), "student", 40, records)
    return tmp_path, path, problems, rows


def test_records_in_set_order_with_the_verdict_and_the_reason(written):
    tmp_path, path, problems, rows = written
    assert path.endswith("eval_samples/student_iter_0000040.jsonl")
    records = read_samples(path)
    assert [r["index"] for r in records] == [1, 5, 9]
    assert [r["uid"] for r in records] == [problems[i].uid for i in (0, 2, 4)]
    for r, i in zip(records, (0, 2, 4)):
        assert r["prompt"] == problems[i].prompt and r["set"] == "eval"
        assert [x["correct"] for x in r["responses"]] == rows[i] == [True, False, False, False]
        kinds = [x["why"].split(":")[0] if x["why"] else None for x in r["responses"]]
        assert kinds == [None, "size not allowed", "subtraction", "unfinished"]
        assert all(x["tokens"] == len(x["text"]) for x in r["responses"])


def test_mistake_table_counts_the_kinds(written):
    tmp_path, path, _, _ = written
    teacher = [{"set": "eval", "index": 0, "responses": [
        {"text": "x", "correct": False, "why": None},
        {"text": "y", "correct": True, "why": None},
    ]}]  # fmt: skip
    with open(tmp_path / "eval_samples" / "teacher_iter_0000000.jsonl", "w") as f:
        f.write(json.dumps(teacher[0]) + "\n")
    total, right, kinds = count_mistakes(read_samples(path))
    assert (total, right) == (12, 3)
    assert kinds == {"size not allowed": 3, "subtraction": 3, "unfinished": 3}

    lines = mistake_table(tmp_path).splitlines()
    assert lines[0] == (
        "| evaluation | responses | right | size not allowed | subtraction | unfinished | wrong |"
    )
    assert lines[2] == "| teacher 0 | 2 | 0.500 | 0.000 | 0.000 | 0.000 | 0.500 |"
    assert lines[3] == "| student 40 | 12 | 0.250 | 0.250 | 0.250 | 0.250 | 0.000 |"


def test_command_line(written, tmp_path):
    run = [sys.executable, "-m", "megatron_eaopd.eval.samples"]
    proc = subprocess.run(run + [str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "| student 40 | 12 | 0.250 |" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(run + [str(empty)], capture_output=True, text=True)
    assert proc.returncode == 2 and "eval.save_samples" in proc.stderr


def test_write_failure_warns_and_leaves_nothing(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level("WARNING"):
        assert write_samples(str(blocker), "student", 3, [{"set": "a", "index": 0}]) is None
    assert "evaluation samples not saved" in caplog.text
    assert blocker.read_text() == "not a folder"


def test_rewrite_replaces_and_odd_text_round_trips(tmp_path):
    odd = "emoji \ud83d broken | \u2028 \u00e9 " + "x" * 10_000  # a lone surrogate, a bar
    first = [{"set": "b", "index": 0, "responses": []}, {"set": "a", "index": 1, "responses": []}]
    write_samples(str(tmp_path), "student", 5, first)
    second = [{"set": "a", "index": 0, "prompt": odd, "responses": [
        {"text": odd, "correct": False, "why": "odd | kind: x"}]}]  # fmt: skip
    path = write_samples(str(tmp_path), "student", 5, second)
    assert read_samples(path) == second
    assert sorted(p.name for p in (tmp_path / "eval_samples").iterdir()) == [
        "student_iter_0000005.jsonl"
    ]
    table = mistake_table(tmp_path).splitlines()
    assert table[0].endswith("| odd \\| kind |") and table[2].startswith("| student 5 | 1 | 0.000")


def test_one_row_per_set_when_there_are_several(tmp_path):
    def rec(name, ok):
        return {"set": name, "index": 0, "responses": [{"correct": ok, "why": None}]}

    write_samples(str(tmp_path), "student", 0, [rec("b", True), rec("a", False)])
    lines = mistake_table(tmp_path / "eval_samples").splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["student 0 (a)", "student 0 (b)"]
