"""Models given as HF folders in the config: the shape comes from config.json, and a shape that
disagrees, a folder with a project checkpoint, a missing config.json or two tokenizers that map
tokens differently are refused when the config loads, naming the key."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from megatron_eaopd.config import ConfigError, load_config
from tests.paper_configs import write_config

PAPER = Path(__file__).resolve().parents[2] / "configs" / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"


def _folders(tmp):
    return write_config(str(tmp), "Qwen3-8B"), write_config(str(tmp), "Qwen3-1.7B-Base")


def _tokenizer(folder, vocab):
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump({"model": {"vocab": vocab}, "added_tokens": [{"id": 9, "content": "<e>"}]}, f)


def _problems(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(PAPER, overrides)
    return dict(err.value.problems)


def test_shape_comes_from_config_json_and_a_disagreeing_key_is_refused(tmp_path):
    teacher, student = _folders(tmp_path)
    hf = [f"model.teacher_hf={teacher}", f"model.student_hf={student}"]
    cfg = load_config(PAPER, hf)
    assert (cfg.model.student.layers, cfg.model.student.hidden) == (28, 2048)
    assert (cfg.model.teacher.layers, cfg.model.teacher.rope_base) == (36, 1e6)
    assert load_config(PAPER, [*hf, "model.student.layers=28"]).model.student.layers == 28
    problems = _problems([*hf, "model.student.layers=20", "model.teacher.qk_layernorm=false"])
    assert (
        "disagrees with" in problems["model.student.layers"]
        and "28" in problems["model.student.layers"]
    )
    assert "model.teacher.qk_layernorm" in problems


def test_bad_folders_are_refused_with_the_key(tmp_path):
    teacher, student = _folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = _problems([f"model.teacher_hf={empty}", f"model.student_hf={student}"])
    assert "config.json" in problems["model.teacher_hf"]
    both = [f"model.teacher_hf={teacher}", f"model.student_hf={student}",
            "model.student_checkpoint=ckpt"]  # fmt: skip
    assert "not both" in _problems(both)["model.student_hf"]
    _tokenizer(teacher, {"a": 0, "b": 1})
    _tokenizer(student, {"a": 1, "b": 0})
    problems = _problems([f"model.teacher_hf={teacher}", f"model.student_hf={student}"])
    assert "different ids" in problems["model.student_hf"]
    _tokenizer(student, {"a": 0, "b": 1})  # the same mapping: accepted
    load_config(PAPER, [f"model.teacher_hf={teacher}", f"model.student_hf={student}"])


def test_the_tokenizer_must_be_the_hf_models_own(tmp_path):
    """A task-trained tokenizer, or a tokenizer folder that maps a token to another id than the
    models' tokenizer.json, cannot drive HF models (their embedding rows index their own ids);
    checked on the resolved config, so kind auto is covered."""
    teacher, student = _folders(tmp_path)
    hf = [f"model.teacher_hf={teacher}", f"model.student_hf={student}"]
    problems = _problems([*hf, "tokenizer.kind=task", "tokenizer.chat_template=false"])
    assert "model.teacher_hf / model.student_hf" in problems["tokenizer.kind"]
    _tokenizer(teacher, {"a": 0, "b": 1})
    _tokenizer(student, {"a": 0, "b": 1})
    other = tmp_path / "other"
    other.mkdir()
    _tokenizer(str(other), {"a": 1, "b": 0})
    for kind in ("auto", "huggingface"):
        problems = _problems([*hf, f"tokenizer.kind={kind}", f"tokenizer.path={other}"])
        assert "maps 2 token(s) to other ids" in problems["tokenizer.path"]
    _tokenizer(str(other), {"a": 0, "b": 1, "pad": 2})  # the same ids plus one: accepted
    cfg = load_config(PAPER, [*hf, f"tokenizer.path={other}"])
    assert cfg.tokenizer.path == str(other)
    assert load_config(PAPER, hf).tokenizer.path == teacher  # auto: the teacher folder's
    # a student folder alone: auto takes its tokenizer; a task tokenizer is refused
    alone = [f"model.student_hf={student}", "model.teacher_hf=null", "teacher_prep.enabled=true",
             "tokenizer.chat_template=false", "task.name=builtin", "task.distill_file=null",
             "task.eval_files=[]", "task.prompt_suffix=''"]  # fmt: skip
    cfg = load_config(PAPER, alone)
    assert (cfg.tokenizer.kind, cfg.tokenizer.path) == ("huggingface", student)
    assert "model.student_hf" in _problems([*alone, "tokenizer.kind=task"])["tokenizer.kind"]


def _recorded_checkpoint(root: str, source: str | None, vocab: int = 300) -> str:
    """A checkpoint root whose metadata records a model config (as import-hf and trainer saves
    do) and ``source``; config loading reads nothing else."""
    from megatron_eaopd.models import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=vocab, vocab_pad_for_tp=8)  # fmt: skip
    os.makedirs(os.path.join(root, "iter_0000000"))
    meta = {"iteration": 0, "layout": {}, "model_config": cfg.to_dict(), "source": source}
    with open(os.path.join(root, "iter_0000000", "eaopd_meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000000\n")
    return root


BASE = PAPER.parent / "base.yaml"


def test_a_checkpoints_recorded_config_gives_the_shape_and_vocab_size_0_means_unset(tmp_path):
    root = _recorded_checkpoint(str(tmp_path / "ckpt"), None)
    cfg = load_config(BASE, [f"model.student_checkpoint={root}"])
    assert (cfg.model.student.layers, cfg.model.student.vocab_size) == (2, 300)
    # the resolved config.yaml of earlier versions writes vocab_size: 0 ("the tokenizer's size")
    cfg = load_config(BASE, [f"model.student_checkpoint={root}", "model.student.vocab_size=0"])
    assert cfg.model.student.vocab_size == 300
    problems = _problems_of(BASE, [f"model.student_checkpoint={root}", "model.student.heads=8"])
    assert "disagrees with the model config recorded in" in problems["model.student.heads"]


def _problems_of(path, overrides):
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return dict(err.value.problems)


def test_an_imported_checkpoint_brings_its_tokenizer_and_refuses_a_task_one(tmp_path):
    """tokenizer.kind auto resolved to a task-trained tokenizer next to imported checkpoints,
    whose embeddings index the HF folder's ids: every check passed and the run trained on
    mismatched ids."""
    hf = str(tmp_path / "hf")
    os.makedirs(hf)
    root = _recorded_checkpoint(str(tmp_path / "ckpt"), f"hf:{hf}")
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
    cfg = load_config(BASE, [f"model.teacher_checkpoint={root}"])
    assert (cfg.tokenizer.kind, cfg.tokenizer.path) == ("huggingface", hf)
    problems = _problems_of(BASE, [f"model.teacher_checkpoint={root}", "tokenizer.kind=task"])
    assert f"imported from {hf}" in problems["tokenizer.kind"]
    assert f"tokenizer.path={hf}" in problems["tokenizer.kind"]
    os.remove(os.path.join(hf, "tokenizer_config.json"))  # the folder lost its tokenizer: auto
    problems = _problems_of(BASE, [f"model.teacher_checkpoint={root}"])  # cannot pick it
    assert "cannot drive the model of model.teacher_checkpoint" in problems["tokenizer.kind"]
    # no folder named holds a tokenizer now: not advised as tokenizer.path
    assert f"tokenizer.path={hf}" not in problems["tokenizer.kind"]
    assert "a copy of that model's tokenizer folder" in problems["tokenizer.kind"]
    plain = _recorded_checkpoint(str(tmp_path / "trainer-save"), None)  # not an import: fine
    assert load_config(BASE, [f"model.teacher_checkpoint={plain}"]).tokenizer.kind == "task"


def test_imports_of_folders_with_different_tokenizers_are_refused(tmp_path):
    """Teacher and student imported from folders whose tokenizers map tokens to other ids (or
    one imported, the other an HF folder): the same refusal as two HF folders get."""
    folders = {}
    for name, vocab in (("a", {"x": 0, "y": 1}), ("b", {"x": 1, "y": 0}), ("c", {"x": 0, "y": 1})):
        folders[name] = str(tmp_path / name)
        os.makedirs(folders[name])
        _tokenizer(folders[name], vocab)
        with open(os.path.join(folders[name], "tokenizer_config.json"), "w") as f:
            json.dump({}, f)
    roots = {n: _recorded_checkpoint(str(tmp_path / f"ckpt-{n}"), f"hf:{f}")
             for n, f in folders.items()}  # fmt: skip
    same = [f"model.teacher_checkpoint={roots['a']}", f"model.student_checkpoint={roots['c']}"]
    assert load_config(BASE, same).tokenizer.path == folders["a"]
    other = [f"model.teacher_checkpoint={roots['a']}", f"model.student_checkpoint={roots['b']}"]
    problems = _problems_of(BASE, other)
    text = problems["model.student_checkpoint"]
    assert "map tokens to different ids" in text and f"imported from {folders['b']}" in text
    # the tokenizer auto picked is the teacher's: no second problem telling the user to do
    # what they did (tokenizer.path=null with kind auto)
    assert "tokenizer.path" not in problems
    write_config(str(tmp_path), "Qwen3-8B")
    mixed = [f"model.teacher_hf={tmp_path / 'Qwen3-8B'}", f"model.student_checkpoint={roots['b']}"]
    _tokenizer(str(tmp_path / "Qwen3-8B"), {"x": 0, "y": 1})
    problems = _problems_of(BASE, mixed)
    assert "map tokens to different ids" in problems["model.student_checkpoint"], problems


def test_an_import_whose_folder_is_gone_is_checked_by_its_recorded_tokenizer(tmp_path):
    """An import made from a scratch folder deleted since: the check followed only the folder,
    found nothing, and a student with another tokenizer trained silently."""
    from megatron_eaopd.config.hf_models import tokenizer_fingerprint, tokenizer_warning

    teacher, student = _folders(tmp_path)
    _tokenizer(student, {"x": 1, "y": 0})
    gone = str(tmp_path / "gone")
    root = _recorded_checkpoint(str(tmp_path / "ckpt"), f"hf:{gone}")
    hf = ["model.teacher_hf=null", f"model.teacher_checkpoint={root}",
          f"model.student_hf={student}", "teacher_prep.enabled=false"]  # fmt: skip
    assert "imported from" in tokenizer_warning(load_config(PAPER, hf))  # nothing recorded
    os.makedirs(gone)
    _tokenizer(gone, {"x": 0, "y": 1})
    recorded = tokenizer_fingerprint(gone)
    shutil.rmtree(gone)
    meta_path = os.path.join(root, "iter_0000000", "eaopd_meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["extra"] = {"hf": {"tokenizer_fingerprint": recorded}}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert "map tokens to different ids" in _problems(hf)["model.student_hf"]
    _tokenizer(student, {"x": 0, "y": 1})  # the same table: accepted, no warning
    assert tokenizer_warning(load_config(PAPER, hf)) is None


def test_a_slow_tokenizer_folder_is_compared_by_its_vocab_json(tmp_path):
    """A folder with vocab.json + merges.txt and no tokenizer.json: the refusal of different
    ids became a warning that the ids cannot be checked."""
    teacher, student = _folders(tmp_path)
    _tokenizer(teacher, {"x": 0, "y": 1})  # and "<e>" at 9
    with open(os.path.join(student, "vocab.json"), "w") as f:
        json.dump({"x": 1, "y": 0}, f)
    with open(os.path.join(student, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {"9": {"content": "<e>", "special": True}}}, f)
    hf = [f"model.teacher_hf={teacher}", f"model.student_hf={student}"]
    assert "map tokens to different ids" in _problems(hf)["model.student_hf"]
    with open(os.path.join(student, "vocab.json"), "w") as f:
        json.dump({"x": 0, "y": 1}, f)  # the slow form of the same tokenizer: accepted
    load_config(PAPER, hf)
    # transformers before 4.34: the added tokens in added_tokens.json
    with open(os.path.join(student, "tokenizer_config.json"), "w") as f:
        json.dump({}, f)
    assert "map tokens to different ids" in _problems(hf)["model.student_hf"]  # <e> unknown
    with open(os.path.join(student, "added_tokens.json"), "w") as f:
        json.dump({"<e>": 9}, f)
    load_config(PAPER, hf)


def test_a_model_folder_without_tokenizer_files_is_not_a_tokenizer(tmp_path):
    """tokenizer.kind auto took a teacher folder saved without its tokenizer: transformers
    loaded an empty tokenizer (one id) and the run failed later, saying the prompts encode to
    no token. Refused when the config loads, naming the folder and the one that has them."""
    teacher, student = _folders(tmp_path)
    hf = [f"model.teacher_hf={teacher}", f"model.student_hf={student}"]
    os.remove(os.path.join(teacher, "tokenizer_config.json"))
    text = _problems(hf)["tokenizer.path"]
    assert text.startswith(f"{teacher} (the model folder model.teacher_hf")
    assert "holds no tokenizer files" in text
    assert f"tokenizer.path={student}" in text
    assert load_config(PAPER, [*hf, f"tokenizer.path={student}"]).tokenizer.path == student
    os.remove(os.path.join(student, "tokenizer_config.json"))
    assert "tokenizer.path=" not in _problems(hf)["tokenizer.path"]  # neither folder has them


def test_sequences_beyond_a_models_trained_context_are_warned_about(tmp_path):
    """rollout.max_response_tokens=40000 with Qwen3-1.7B-Base (32,768 positions) was accepted
    silently; the run would decode past the context the model was trained for."""
    from megatron_eaopd.config.hf_models import context_warning

    teacher, student = _folders(tmp_path)
    hf = [f"model.teacher_hf={teacher}", f"model.student_hf={student}"]
    assert context_warning(load_config(PAPER, hf)) is None  # 1,024 + 8,192 positions
    long = ["rollout.max_response_tokens=36000", "eval.max_response_tokens=36000"]
    text = context_warning(load_config(PAPER, [*hf, *long]))
    assert "the student's sequences reach 37024 positions, beyond the 32768" in text
    assert "the teacher's" not in text  # Qwen3-8B: 40,960 positions
    assert "Lower rollout.max_prompt_tokens" in text


def test_too_few_embedding_rows_name_whose_tokenizer_it_is(tmp_path):
    """An HF model with fewer rows than the tokenizer's ids was told to use its own tokenizer
    with kind auto, the setting in effect: the advice follows whose tokenizer it is."""
    from megatron_eaopd.config.checks import run_problems

    teacher, student = _folders(tmp_path)
    cfg = load_config(PAPER, [f"model.teacher_hf={teacher}", f"model.student_hf={student}"])
    assert cfg.tokenizer.path == teacher  # auto: the teacher folder's
    problems = dict(run_problems(cfg, 8, vocab_size=200_000, cuda_available=True,
                                 math_verify_installed=True, gpu=("H100", 9, 0)))  # fmt: skip
    assert "the tokenizer is that model's own): its config.json disagrees" in (
        problems["model.teacher.vocab_size"])  # fmt: skip
    assert f"the tokenizer is {teacher}, the other model's): teacher and student must share" in (
        problems["model.student.vocab_size"])  # fmt: skip
    other = tmp_path / "tok"
    other.mkdir()
    cfg.tokenizer.path = str(other)
    text = dict(run_problems(cfg, 8, vocab_size=200_000, cuda_available=True,
                             math_verify_installed=True, gpu=("H100", 9, 0)))  # fmt: skip
    assert "is not this model's; use its own" in text["model.student.vocab_size"]
