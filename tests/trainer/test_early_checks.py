"""What the trainer refuses before any compute (``eaopd-train`` exits 2 with the message): model
sources that do not exist, preparations whose batch does not split over their data-parallel
ranks, the exact form with unequal padded vocabularies, out-of-range seeds, tokenizers that do
not load. Each of these used to surface only after minutes of teacher preparation or at model
build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_eaopd.config import ConfigError, load_config
from megatron_eaopd.data import TaskError, prepare_data
from megatron_eaopd.trainer.loop import check_data_config, check_trainer_config
from tests.trainer.common import tiny_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"


def test_missing_or_partial_checkpoints_are_refused_with_their_key(tmp_path):
    cfg = load_config(TINY, [f"model.teacher_checkpoint={tmp_path / 'nope'}",
                             f"model.student_checkpoint={tmp_path}"])  # fmt: skip
    with pytest.raises(ValueError) as err:
        check_trainer_config(cfg, 2)
    text = str(err.value)
    assert f"model.teacher_checkpoint={tmp_path / 'nope'}: no such folder" in text
    assert "model.teacher_checkpoint=null with teacher_prep.enabled=true" in text
    assert f"model.student_checkpoint={tmp_path}: not a complete checkpoint root" in text
    assert "not an iteration folder" in text
    check_trainer_config(load_config(TINY), 2)  # the preparations instead: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"student_checkpoint=.*file: a file, not a folder"):
        check_trainer_config(load_config(TINY, [f"model.student_checkpoint={tmp_path / 'file'}"]),
                             2)  # fmt: skip


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_a_preparation_batch_must_split_over_its_data_parallel_ranks(tmp_path, who):
    cfg = tiny_config(tmp_path, f"{who}_prep.batch_size=15")
    data = prepare_data(cfg)
    want = rf"{who}_prep.batch_size=15 must be a multiple of the {who}'s data-parallel size 2 "
    with pytest.raises(ValueError, match=want):
        check_data_config(cfg, data, 2)
    check_data_config(cfg, data, 1)  # DP 1: any batch
    # a preparation cached before (here: faked by its marker) is reused at any world size
    from megatron_eaopd.models.checkpoint import LATEST
    from megatron_eaopd.trainer.build import model_configs
    from megatron_eaopd.trainer.teacher_prep import supervised_cache_key

    mcfg = dict(zip(("student", "teacher"), model_configs(cfg, data.vocab_size)))[who]
    prep = getattr(cfg, f"{who}_prep")
    root = os.path.join(prep.cache_dir, supervised_cache_key(data, mcfg, prep, who))
    os.makedirs(root)
    Path(root, LATEST).write_text("iter_0000001")
    check_data_config(cfg, data, 2)
    if who == "student":  # a preparation that does not run is not checked
        off = tiny_config(tmp_path, "student_prep.batch_size=15", "student_prep.enabled=false")
        check_data_config(off, data, 2)


def test_exact_form_padded_vocabularies_are_compared_before_any_compute(tmp_path):
    data = prepare_data(tiny_config(tmp_path))
    check_data_config(tiny_config(tmp_path), data, 2)
    cfg = tiny_config(tmp_path, "model.teacher.vocab_size=256")
    with pytest.raises(ValueError, match=r"padded vocabularies differ \(\d+ vs 256 rows at tp 1"):
        check_data_config(cfg, data, 2)
    # the sampled form carries top-k ids, not logits shards: unequal sizes are fine there
    sampled = tiny_config(tmp_path, "model.teacher.vocab_size=256", "loss.form=sampled",
                    "loss.objective=eopd")  # fmt: skip
    check_data_config(sampled, data, 2)


def test_seeds_are_bounded_and_tokenizers_that_do_not_load_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"training.seed: out of range.*<= 4294967295"):
        load_config(TINY, ["training.seed=100000000000000"])
    with pytest.raises(ConfigError, match="teacher_prep.seed: out of range"):
        load_config(TINY, ["teacher_prep.seed=-1"])
    missing = str(tmp_path / "x.model")
    cfg = load_config(TINY, ["tokenizer.kind=sentencepiece", f"tokenizer.path={missing}"])
    with pytest.raises(TaskError, match=r"tokenizer.path='.*x.model': the sentencepiece "):
        prepare_data(cfg)
    junk = tmp_path / "tokenizer.json"  # a file, not a sentencepiece model: was a traceback
    junk.write_text('{"model": {"type": "BPE"}}')
    cfg = load_config(TINY, ["tokenizer.kind=sentencepiece", f"tokenizer.path={junk}"])
    with pytest.raises(TaskError, match=r"'.*tokenizer.json': the sentencepiece .*RuntimeError"):
        prepare_data(cfg)
    cfg = load_config(TINY, ["tokenizer.kind=huggingface", f"tokenizer.path={tmp_path}/hf"])
    with pytest.raises(TaskError, match=r"tokenizer.path='.*hf': the huggingface tokenizer "):
        prepare_data(cfg)


def test_a_random_student_next_to_an_hf_teacher_is_refused(tmp_path):
    """configs/qwen3-8b-paper.yaml run alone would distil Qwen3-8B into the schema's default
    2 x 64 random student."""
    from tests.paper_configs import hf_overrides, write_weight_headers

    paper = TINY.parent / "qwen3-8b-paper.yaml"
    cfg = load_config(paper, [*hf_overrides(paper, str(tmp_path)), "eval.use_math_verify=false"])
    assert cfg.model.teacher_hf and not cfg.model.student_hf
    with pytest.raises(ValueError, match="the student has no source next to the Hugging Face"):
        check_trainer_config(cfg, 8)
    full = TINY.parent / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"
    cfg = load_config(full, hf_overrides(full, str(tmp_path)))
    with pytest.raises(ValueError, match="has no weights"):  # config.json alone
        check_trainer_config(cfg, 8)
    for folder in (cfg.model.teacher_hf, cfg.model.student_hf):
        write_weight_headers(folder)  # the published shapes, as headers of a sparse file
    check_trainer_config(cfg, 8)


def test_hf_weight_files_are_checked_before_any_compute(tmp_path):
    """A broken or pickled weights folder used to surface in Trainer.setup, after the layouts,
    the data preparation and the whole teacher load (minutes at 8B), and the pickle hint named
    an option the trainer does not have."""
    import torch

    from tests.paper_configs import hf_overrides, write_weight_headers

    full = TINY.parent / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"
    cfg = load_config(full, hf_overrides(full, str(tmp_path)))
    teacher, student = cfg.model.teacher_hf, cfg.model.student_hf
    write_weight_headers(teacher)
    weights = os.path.join(student, "model.safetensors")
    write_weight_headers(student)
    with open(weights, "r+b") as f:  # an interrupted download
        f.truncate(os.path.getsize(weights) - 4096)
    with pytest.raises(ValueError) as err:
        check_trainer_config(cfg, 8)
    assert f"model.student_hf={student}: safetensors shard" in str(err.value)
    assert "is truncated" in str(err.value) and "teacher_hf" not in str(err.value)
    os.remove(weights)
    torch.save({"x": torch.zeros(1)}, os.path.join(student, "pytorch_model.bin"))
    with pytest.raises(ValueError) as err:
        check_trainer_config(cfg, 8)
    text = str(err.value)
    assert f"model.student_hf={student}: the folder holds pickled weights" in text
    assert "save_pretrained(new_folder, safe_serialization=True)" in text
    assert "--trust-pickle" not in text and "trust_pickle" not in text


def test_a_preparation_that_cannot_write_its_cache_is_refused_before_it_trains(tmp_path):
    (tmp_path / "file").write_text("")  # a folder below a file: not creatable, even as root
    cfg = tiny_config(tmp_path, f"teacher_prep.cache_dir={tmp_path / 'file' / 'teachers'}")
    data = prepare_data(cfg)
    want = r"teacher_prep.cache_dir=.*/file/teachers cannot be written \(.*\): the teacher would"
    with pytest.raises(ValueError, match=want):
        check_data_config(cfg, data, 2)
    check_data_config(tiny_config(tmp_path), data, 2)  # a writable one
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".write-check")]
    # a resumed run prepares no student warm start: its cache folder (and batch) are not checked
    students = [f"student_prep.cache_dir={tmp_path / 'file' / 's'}", "student_prep.batch_size=15",
                f"training.output_dir={tmp_path / 'run'}"]  # fmt: skip
    with pytest.raises(ValueError, match=r"student_prep.cache_dir=.* cannot be written"):
        check_data_config(tiny_config(tmp_path, *students), data, 2)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000001\n")
    check_data_config(tiny_config(tmp_path, *students), data, 2)
    with pytest.raises(ValueError, match=r"student_prep.cache_dir=.* cannot be written"):
        check_data_config(tiny_config(tmp_path, *students, "training.resume=false"), data, 2)


def test_micro_batches_that_shrink_to_a_poor_divisor_are_warned_about(tmp_path):
    """Rows per replica and step with no divisor near rollout.micro_batch_size: a warning that
    names the sizes; none for the shipped configs' layouts or an even split."""
    from megatron_eaopd.trainer.checks import micro_batch_warning

    def warn(world, *over):
        cfg = load_config(TINY, ["rollout.samples_per_prompt=1", *over])
        return micro_batch_warning(cfg, world)

    tp = load_config(TINY).parallel.student.tp * load_config(TINY).parallel.student.pp
    even = ["rollout.mini_batch_size=8", "rollout.micro_batch_size=4",
            "rollout.prompts_per_iteration=16"]  # fmt: skip
    assert warn(tp, *even) is None
    text = warn(tp, "rollout.mini_batch_size=7", "rollout.micro_batch_size=4",
                "rollout.prompts_per_iteration=14")  # fmt: skip
    assert text and "7 rows per optimizer step" in text and "7 micro-batches of 1" in text, text
    # DP 2 deals 7 prompts as 4 + 3
    text = warn(2 * tp, "rollout.mini_batch_size=7", "rollout.micro_batch_size=3",
                "rollout.prompts_per_iteration=14")  # fmt: skip
    assert text is None  # 3 rows: one micro-batch of 3; 4 rows: two of 2 (not below half)
    assert warn(2 * tp, "rollout.mini_batch_size=10", "rollout.micro_batch_size=4",
                "rollout.prompts_per_iteration=20")  # fmt: skip
    # a token budget needs no divisor; it is warned about when micro_batch_size rows at the limit
    # (16 + 80 tokens in this config) fit it: then it changes nothing
    assert warn(tp, *even, "rollout.micro_batch_tokens=192", "rollout.micro_batch_size=3") is None
    text = warn(tp, *even, "rollout.micro_batch_tokens=384")
    assert text and "micro_batch_tokens=384 never binds" in text and "384 positions" in text, text
    assert "raise micro_batch_size" in text
    # 8 rows per step (mini-batch 8, one sample) in one budget of 8 x 96: a whole step fits
    text = warn(tp, *even, "rollout.micro_batch_tokens=768", "rollout.micro_batch_size=32")
    assert text and "a whole step's 8 rows fit in it" in text, text
    assert warn(tp, *even, "rollout.micro_batch_tokens=767", "rollout.micro_batch_size=32") is None
    # under sequence parallelism rows round up to tp: 16 + 79 tokens are cut at 96
    sp = ["parallel.student.tp=2", "parallel.teacher.tp=2", "parallel.sequence_parallel=true",
          "rollout.max_response_tokens=79", "eval.max_response_tokens=79"]  # fmt: skip
    assert warn(2, *even, *sp, "rollout.micro_batch_tokens=383") is None  # 4 x 96 > 383
    assert "never binds" in warn(2, *even, *sp, "rollout.micro_batch_tokens=384")
    from tests.paper_configs import hf_overrides

    for path in sorted(TINY.parent.glob("*.yaml")):  # the shipped configs at their world size
        cfg = load_config(path, hf_overrides(path, str(tmp_path)))
        p = cfg.parallel.student
        for world in {p.tp * p.pp, 8 if path.name.startswith("qwen3") else 2 * p.tp * p.pp}:
            assert micro_batch_warning(cfg, world) is None, (path.name, world)


def test_prep_cache_keys_do_not_change_with_the_export_only_model_field():
    """ModelConfig.hf_max_position_embeddings (export metadata) joined to_dict(); unset, it must
    leave the preparation cache keys as earlier versions computed them (or every cached teacher
    and student is trained again after an upgrade)."""
    import dataclasses
    from types import SimpleNamespace

    from megatron_eaopd.config.schema import TeacherPrepConfig
    from megatron_eaopd.models.config import TINY_TEACHER
    from megatron_eaopd.trainer.teacher_prep import supervised_cache_key

    data = SimpleNamespace(task=SimpleNamespace(fingerprint=lambda: "task-x"),
                           tokenizer=SimpleNamespace(fingerprint="tok-y"))  # fmt: skip
    prep = TeacherPrepConfig()
    key = supervised_cache_key(data, TINY_TEACHER, prep)

    class Earlier:  # to_dict() as before the field existed
        def to_dict(self):
            d = dataclasses.asdict(TINY_TEACHER)
            d.pop("hf_max_position_embeddings")
            return d

    assert key == supervised_cache_key(data, Earlier(), prep)
    other = TINY_TEACHER.with_changes(num_layers=TINY_TEACHER.num_layers + 1)
    assert supervised_cache_key(data, other, prep) != key
    # nor with the length the rollout and evaluation limits give (test_update checks that the
    # trained weights do not depend on it)
    longer = TINY_TEACHER.with_changes(max_sequence_length=TINY_TEACHER.max_sequence_length * 3)
    assert supervised_cache_key(data, longer, prep) == key


def test_a_model_folder_without_tokenizer_json_is_warned_about(tmp_path):
    """A student saved without its tokenizer: the shared-vocabulary check needs both
    tokenizer.json files, so it was skipped silently."""
    import json

    from megatron_eaopd.config.hf_models import tokenizer_warning
    from tests.paper_configs import hf_overrides

    full = TINY.parent / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"
    cfg = load_config(full, hf_overrides(full, str(tmp_path)))
    text = tokenizer_warning(cfg)  # config-only folders: neither has one
    assert f"model.teacher_hf={cfg.model.teacher_hf} and model.student_hf=" in text
    assert "cannot be checked" in text
    for folder in (cfg.model.teacher_hf, cfg.model.student_hf):
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}, f)
    assert tokenizer_warning(load_config(full, hf_overrides(full, str(tmp_path)))) is None
    os.remove(os.path.join(cfg.model.student_hf, "tokenizer.json"))
    text = tokenizer_warning(load_config(full, hf_overrides(full, str(tmp_path))))
    assert text.startswith(f"model.student_hf={cfg.model.student_hf}: no tokenizer.json or")
    assert tokenizer_warning(load_config(TINY)) is None  # no HF folders


def test_prep_cache_keys_follow_a_hugging_face_tokenizers_content_not_its_path(tmp_path):
    """The key held an HF tokenizer's path only: a folder refilled with another vocabulary, or
    prompts wrapped in its chat template, reused a teacher prepared on other ids."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from megatron_eaopd.config.schema import TeacherPrepConfig
    from megatron_eaopd.data.sequences import use_chat_template
    from megatron_eaopd.models.config import TINY_TEACHER
    from megatron_eaopd.trainer.teacher_prep import supervised_cache_key
    from tests.models.test_hf_convert import _tokenizer

    def key(folder, chat=None):
        tok = AutoTokenizer.from_pretrained(str(folder))
        if chat is not None:
            use_chat_template(tok, chat)
        data = SimpleNamespace(task=SimpleNamespace(fingerprint=lambda: "task-x"), tokenizer=tok)
        return supervised_cache_key(data, TINY_TEACHER, TeacherPrepConfig())

    _tokenizer(str(tmp_path / "a"), 40)
    _tokenizer(str(tmp_path / "b"), 40)  # the same tokenizer in another folder
    _tokenizer(str(tmp_path / "c"), 41)  # another vocabulary
    base = key(tmp_path / "a")
    assert key(tmp_path / "b") == base
    assert key(tmp_path / "c") != base
    wrapped = key(tmp_path / "a", chat=False)  # prompts in the chat template (non-thinking)
    assert wrapped != base and key(tmp_path / "a", chat=True) != wrapped


def test_truncated_training_rollouts_are_warned_about():
    """top_p < 1 or top_k > 0 in the training rollouts of the sampled form: the samples are not
    those of the distribution their log-probs describe; the CPU configs sample untruncated."""
    from megatron_eaopd.trainer.checks import sampling_warning

    sampled = ["loss.form=sampled"]
    assert sampling_warning(load_config(TINY, sampled)) is None
    text = sampling_warning(load_config(TINY, [*sampled, "rollout.top_p=0.9"]))
    assert "rollout.top_p=0.9, rollout.top_k=0" in text and "biased" in text
    assert "rollout.top_k=5" in sampling_warning(load_config(TINY, [*sampled, "rollout.top_k=5"]))
    exact = load_config(TINY, ["rollout.top_p=0.9", "loss.form=exact"])
    assert sampling_warning(exact) is None  # no PPO ratio, no sampled reverse KL
    for name in ("base.yaml", "tiny-cpu-tp2.yaml"):
        assert sampling_warning(load_config(TINY.with_name(name), sampled)) is None


def test_a_teacher_preparation_without_training_problems_names_the_keys(tmp_path):
    cfg = tiny_config(tmp_path, "task.synthetic.num_train=0")
    with pytest.raises(TaskError, match=r"the task has none: raise task.synthetic.num_train"):
        prepare_data(cfg)
