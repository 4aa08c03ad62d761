"""A task given as JSONL prompt files (prompt, answer, optional solutions) runs through the trainer
with no code: tokenizer trained on the files, teacher prepared on the train file's solutions,
distillation on the distill file, evaluation per eval file (TP=2 over gloo)."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu-tp2.yaml")


def _write(path, n, seed, solutions):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            rec = {"id": f"{os.path.basename(path)}-{i}", "prompt": f"Add {a} and {b}.",
                   "answer": a + b, "level": 1}  # fmt: skip
            if solutions:
                rec["solutions"] = [f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}"]
            f.write(json.dumps(rec) + "\n")
            if i % 5 == 0:
                f.write("\n")  # blank lines are skipped


def _overrides(tmp):
    return [
        "task.name=jsonl",
        f"task.train_file={tmp}/train.jsonl",
        f"task.distill_file={tmp}/distill.jsonl",
        f"task.eval_files=[{tmp}/heldout.jsonl,{tmp}/more.jsonl]",
        "tokenizer.vocab_size=48",
        "training.iterations=2",
        "training.eval_interval=2",
        "training.checkpoint_interval=2",
        "rollout.prompts_per_iteration=4",
        "rollout.mini_batch_size=4",
        "rollout.micro_batch_size=4",
        "optimizer.warmup_iterations=2",  # at most the run's 2 optimizer steps
        "rollout.max_response_tokens=16",
        "eval.k=2",
        "eval.max_response_tokens=16",
        "eval.save_samples=null",  # every prompt (the DP tests run the default, 16, and 3)
        "teacher_prep.iterations=4",
        "teacher_prep.batch_size=8",
        "student_prep.enabled=false",
        "logging.progress_bars=false",
        "logging.console=false",
        f"training.output_dir={tmp}/run",
        f"training.export_hf={tmp}/export",
        f"teacher_prep.cache_dir={tmp}/teachers",
        f"tokenizer.cache_dir={tmp}/tokenizers",
    ]


def _worker(rank, world, tmp):
    from megatron_eaopd.cli import run
    from megatron_eaopd.config import load_config

    return run(load_config(CONFIG, _overrides(tmp)))


def test_jsonl_task_through_the_trainer(tmp_path):
    tmp = str(tmp_path)
    _write(f"{tmp}/train.jsonl", 40, 0, solutions=True)
    _write(f"{tmp}/distill.jsonl", 8, 1, solutions=False)
    _write(f"{tmp}/heldout.jsonl", 3, 2, solutions=False)
    _write(f"{tmp}/more.jsonl", 2, 3, solutions=False)

    from megatron_eaopd.config import load_config
    from megatron_eaopd.data import prepare_data

    data = prepare_data(load_config(CONFIG, _overrides(tmp)))
    assert len(data.distill) == 8 and list(data.eval_sets) == ["heldout", "more"]
    problem = data.distill[0]
    assert data.task.check(f"so \\boxed{{{problem.answer}}}", problem)
    assert not data.task.check("\\boxed{100}", problem)

    summary = run_distributed(_worker, 2, tmp, timeout=400)[0]
    assert summary["iteration"] == 2 and not summary["stopped_early"]
    with open(f"{tmp}/run/metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [row for row in rows if row["split"] == "train"]
    assert [row["iteration"] for row in train] == [1, 2]
    for row in train:
        assert math.isfinite(row["loss"]) and 0 <= row["reward"] <= 1
        assert 1 <= row["response_length"] <= 16
    evals = [row for row in rows if row["split"] == "eval"]
    assert [row["iteration"] for row in evals] == [0, 2]
    for row in evals:
        assert 0 <= row["heldout/avg@2"] <= row["heldout/pass@2"] <= 1
    # the saved samples of both sets (eval.save_samples null: all), with the default
    # Task.explain's boxed-answer reasons
    with open(f"{tmp}/run/eval_samples/student_iter_0000002.jsonl", encoding="utf-8") as f:
        saved = [json.loads(line) for line in f]
    expected = [("heldout", 0), ("heldout", 1), ("heldout", 2), ("more", 0), ("more", 1)]
    assert [(r["set"], r["index"]) for r in saved] == expected
    by_uid = {p.uid: p for problems in data.eval_sets.values() for p in problems}
    for r in saved:
        for response in r["responses"]:
            ok = data.task.check(response["text"], by_uid[r["uid"]])
            assert response["correct"] == ok and (response["why"] is None) == ok
            if not ok:
                assert response["why"].split(":")[0] in ("no answer", "wrong answer")
    for row in evals:
        assert 0 <= row["more/avg@2"] <= 1
    teacher = [row for row in rows if row["split"] == "teacher"]
    assert len(teacher) == 1 and "heldout/pass@2" in teacher[0]
    # the teacher was prepared on the train file and cached
    assert len([n for n in os.listdir(f"{tmp}/teachers") if not n.endswith(".lock")]) == 1
    # the export of a run with a task (sentencepiece) tokenizer carries its special ids, so
    # that transformers' generate stops at its EOS (they were null)
    tok = data.tokenizer
    for name in ("config.json", "generation_config.json"):
        with open(f"{tmp}/export/{name}", encoding="utf-8") as f:
            written = json.load(f)
        assert (written["bos_token_id"], written["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    # the distillation file rewritten in place (same path, same settings): resuming the saved
    # run on other prompts is refused before any preparation (no second teacher)
    _write(f"{tmp}/distill.jsonl", 8, 5, solutions=False)
    with pytest.raises(AssertionError, match="RunRefused: .*trained on other inputs: distillation"):
        run_distributed(_worker, 2, tmp, timeout=400)
    assert len([n for n in os.listdir(f"{tmp}/teachers") if not n.endswith(".lock")]) == 1
