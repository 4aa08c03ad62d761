"""prepare_data: every data check before any model is built."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_eaopd.config import load_config
from megatron_eaopd.data import TaskError, prepare_data
from megatron_eaopd.data.sequences import encode_prompt

REPO = Path(__file__).resolve().parents[2]


def _tiny(tmp_path, *overrides):
    return load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        [f"tokenizer.cache_dir={tmp_path / 'tok'}", "task.synthetic.num_train=200", *overrides],
    )


def test_tiny_cpu_data_is_consistent(tmp_path):
    cfg = _tiny(tmp_path)
    data = prepare_data(cfg)
    assert data.vocab_size == data.tokenizer.vocab_size <= cfg.tokenizer.vocab_size
    assert len(data.distill) == cfg.task.synthetic.num_distill
    assert list(data.eval_sets) == ["eval"] and len(data.eval_sets["eval"]) == 64
    longest = max(len(encode_prompt(data.tokenizer, p.prompt)) for p in data.distill)
    assert longest <= data.longest_prompt <= cfg.rollout.max_prompt_tokens


def test_prompt_longer_than_limit(tmp_path):
    cfg = _tiny(tmp_path, "rollout.max_prompt_tokens=8")
    with pytest.raises(TaskError, match=r"distillation prompts are longer than .*=8 tokens"):
        prepare_data(cfg)


def test_teacher_examples_must_fit(tmp_path):
    cfg = _tiny(
        tmp_path,
        "rollout.max_response_tokens=20",
        "eval.max_response_tokens=20",
        "model.teacher.max_seq_len=0",
    )
    assert cfg.model.teacher.max_seq_len == cfg.rollout.max_prompt_tokens + 20
    with pytest.raises(TaskError, match="raise model.teacher.max_seq_len"):
        prepare_data(cfg)
    prepare_data(cfg, check_teacher_examples=False)


def test_jsonl_errors_surface(tmp_path):
    distill = tmp_path / "d.jsonl"
    distill.write_text(json.dumps({"prompt": "Compute 1+2 step by step:", "answer": "3"}) + "\n")
    ev = tmp_path / "e.jsonl"
    ev.write_text("")
    cfg = load_config(
        None,
        [
            "task.name=jsonl",
            f"task.distill_file={distill}",
            f"task.eval_files=[{ev}]",
            "model.teacher_checkpoint=some/ckpt",
            f"tokenizer.cache_dir={tmp_path / 'tok'}",
        ],
    )
    with pytest.raises(TaskError, match="e.jsonl: no prompts"):
        prepare_data(cfg)


def test_fewer_prompts_than_one_iteration_are_refused_before_any_compute(tmp_path):
    """A JSONL task with fewer distillation prompts than rollout.prompts_per_iteration (the
    built-in task's count is checked when the config loads)."""
    distill = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Compute {i}+2 step by step:", "answer": str(i + 2)} for i in range(4)]
    distill.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["task.name=jsonl", f"task.distill_file={distill}", f"task.eval_files=[{distill}]",
            "model.teacher_checkpoint=some/ckpt", f"tokenizer.cache_dir={tmp_path / 'tok'}",
            "rollout.mini_batch_size=4"]  # fmt: skip
    with pytest.raises(TaskError, match=r"rollout.prompts_per_iteration=8 exceeds the 4 "):
        prepare_data(load_config(None, [*base, "rollout.prompts_per_iteration=8"]))
    assert (
        len(prepare_data(load_config(None, [*base, "rollout.prompts_per_iteration=4"])).distill)
        == 4
    )


def test_a_task_tokenizer_too_small_for_the_characters_names_the_key(tmp_path, caplog):
    """Text with more distinct characters (here 60 CJK ones) than tokenizer.vocab_size: a
    TaskError naming tokenizer.vocab_size and the size that works (sentencepiece's own count),
    and that size then trains. Without eval files a warning says evaluations measure nothing."""
    distill = tmp_path / "d.jsonl"
    chars = [chr(0x4E00 + i) for i in range(60)]
    rows = [{"prompt": "".join(chars[i : i + 12]), "answer": str(i)} for i in range(0, 60, 6)]
    distill.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    base = ["task.name=jsonl", f"task.distill_file={distill}", "model.teacher_checkpoint=x",
            f"tokenizer.cache_dir={tmp_path / 'tok'}", "rollout.mini_batch_size=2",
            "rollout.prompts_per_iteration=4"]  # fmt: skip
    with pytest.raises(TaskError, match=r"tokenizer.vocab_size=40 is below the (\d+) pieces") as e:
        prepare_data(load_config(None, [*base, "tokenizer.vocab_size=40"]))
    need = re.search(r"at least (\d+)", str(e.value)).group(1)
    assert int(need) >= 60
    with caplog.at_level("WARNING"):
        data = prepare_data(load_config(None, [*base, f"tokenizer.vocab_size={need}"]))
    assert data.vocab_size >= 60
    assert "no evaluation sets" in caplog.text


def test_only_the_evaluation_prompts_in_use_must_fit(tmp_path):
    """An eval file whose fourth prompt is too long, with eval.max_prompts=3: the prompts an
    evaluation never uses were refused; with max_prompts 4 (or null, all) it is still refused."""
    distill = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Compute {i}+2 step by step:", "answer": str(i + 2)} for i in range(4)]
    distill.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = tmp_path / "e.jsonl"
    terms = "+".join(str((7 * i) % 97) for i in range(80))  # no piece covers much of it
    long = {"prompt": f"Compute {terms} step by step:", "answer": "x"}
    ev.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:3], long]))
    base = ["task.name=jsonl", f"task.distill_file={distill}", f"task.eval_files=[{ev}]",
            "model.teacher_checkpoint=some/ckpt", f"tokenizer.cache_dir={tmp_path / 'tok'}",
            "rollout.mini_batch_size=4", "rollout.prompts_per_iteration=4",
            "rollout.max_prompt_tokens=16"]  # fmt: skip
    data = prepare_data(load_config(None, [*base, "eval.max_prompts=3"]))
    assert len(data.eval_sets["e"]) == 4 and data.longest_prompt <= 16
    for used in (4, "null"):
        with pytest.raises(TaskError, match=r"1 of 4 'e' prompts are longer"):
            prepare_data(load_config(None, [*base, f"eval.max_prompts={used}"]))
