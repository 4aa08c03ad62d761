"""Config loader: inheritance, overrides, validation errors, resolved round trip, shipped files."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from megatron_eaopd.config import (
    ConfigError,
    EAOPDConfig,
    apply_overrides,
    config_to_dict,
    describe_fields,
    load_config,
    load_yaml_with_defaults,
    parse_override,
    save_resolved,
)
from tests.paper_configs import hf_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _problems(err: ConfigError) -> dict[str, str]:
    return dict(err.problems)


def test_defaults_merge_in_order_then_file(tmp_path):
    _write(
        tmp_path / "parts" / "one.yaml",
        """
        loss: {top_k: 4, clip: 0.3}
        rollout: {temperature: 0.5}
    """,
    )
    # a relative path inside parts/ resolves against parts/, not the working directory
    _write(
        tmp_path / "parts" / "two.yaml",
        """
        defaults: [deeper/three.yaml]
        loss: {top_k: 8}
    """,
    )
    _write(tmp_path / "parts" / "deeper" / "three.yaml", "loss: {fkl_coef: 0.25, top_k: 2}\n")
    main = _write(
        tmp_path / "main.yaml",
        """
        defaults: [parts/one.yaml, parts/two.yaml]
        loss: {clip: 0.1}
    """,
    )
    merged = load_yaml_with_defaults(main)
    assert "defaults" not in merged
    # one -> (three -> two) -> main, nested sections merged key by key
    assert merged["loss"] == {"top_k": 8, "clip": 0.1, "fkl_coef": 0.25}
    assert merged["rollout"] == {"temperature": 0.5}
    cfg = load_config(main)
    assert (cfg.loss.top_k, cfg.loss.clip, cfg.loss.fkl_coef) == (8, 0.1, 0.25)
    assert cfg.rollout.temperature == 0.5
    assert cfg.loss.entropy_threshold == EAOPDConfig().loss.entropy_threshold  # schema default


def test_defaults_cycle_and_missing_parent(tmp_path):
    _write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    _write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "defaults: [nope.yaml]\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "configs").mkdir()
    _write(tmp_path / "d.yaml", "defaults: [configs]\n")  # a folder, named with its includer
    with pytest.raises(ConfigError, match=r"is a folder, not a config file: .*configs \(in the "
                       r"defaults of .*d.yaml\)"):  # fmt: skip
        load_config(tmp_path / "d.yaml")
    _write(tmp_path / "bad.yaml", "loss: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML syntax"):
        load_config(tmp_path / "bad.yaml")


def test_a_key_repeated_in_one_mapping_is_refused(tmp_path):
    """Plain YAML keeps the last of two ``loss:`` blocks and drops the first one's settings."""
    _write(tmp_path / "twice.yaml", "loss: {objective: opd}\nrollout: {top_p: 0.9}\n"
                                    "loss: {fkl_coef: 0.5}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="'loss' appears twice"):
        load_config(tmp_path / "twice.yaml")
    _write(tmp_path / "inner.yaml", "loss:\n  top_k: 4\n  clip: 0.1\n  top_k: 8\n")
    with pytest.raises(ConfigError, match="'top_k' appears twice"):
        load_config(tmp_path / "inner.yaml")
    # the same key in different mappings, and a parent's key set again by its child, stay fine
    _write(tmp_path / "parent.yaml", "loss: {top_k: 4}\nrollout: {top_k: 4}\n")
    _write(tmp_path / "child.yaml", "defaults: [parent.yaml]\nloss: {top_k: 8}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.loss.top_k, cfg.rollout.top_k) == (8, 4)
    # YAML merge keys merge on purpose: the explicit key after `<<` wins, as in plain YAML
    _write(tmp_path / "merge.yaml", "parallel:\n  student: &lay {tp: 1, pp: 1}\n"
                                    "  teacher: {<<: *lay, tp: 2}\n")  # fmt: skip
    cfg = load_config(tmp_path / "merge.yaml")
    assert (cfg.parallel.teacher.tp, cfg.parallel.teacher.pp) == (2, 1)
    # a repeated key inside one command-line override is refused too
    with pytest.raises(ConfigError, match="'top_k' appears twice"):
        load_config(None, ["loss={top_k: 4, top_k: 8}"])


@pytest.mark.parametrize(
    "text, value",
    [
        ("a.b=3", 3),
        ("a.b=0.5", 0.5),
        ("a.b=true", True),
        ("a.b=null", None),
        ("a.b=[1, 2]", [1, 2]),
        ("a.b=eopd", "eopd"),
        ("a.b='3'", "3"),
        ("a.b=x=y", "x=y"),
    ],
)
def test_override_values_follow_yaml_scalars(text, value):
    parts, parsed = parse_override(text)
    assert parts == ["a", "b"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["training.iterations=", "eval.save_samples= "])
def test_an_override_without_a_value_is_refused(text):
    """YAML reads an empty value as null: an unset shell variable (eval.save_samples=$N) saved
    every prompt's samples (null: all) and training.iterations= fell back to the epochs."""
    key = text.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: override .* has no value: give a value"):
        load_config(TINY, [text])
    assert load_config(TINY, [f"{key}=null"]) is not None


def test_a_config_file_given_as_an_override_names_the_flag():
    with pytest.raises(ConfigError, match=r"key.path=value \(a config file is read with --config"):
        load_config(None, ["configs/tiny-cpu.yaml"])


def test_overrides_apply_last_and_in_order(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "loss: {objective: opd, top_k: 4}\n")
    cfg = load_config(
        cfg_file,
        [
            "loss.objective=jsd",
            "loss.jsd_beta=0.1",
            "parallel.student.vpp=null",
            "loss.top_k=32",
            "task.synthetic.connectives=[so, then]",
            "optimizer.lr=3e-6",
        ],
    )
    assert cfg.loss.objective == "jsd" and cfg.loss.jsd_beta == 0.1 and cfg.loss.top_k == 32
    assert cfg.task.synthetic.connectives == ["so", "then"]
    # YAML 1.1 reads "3e-6" as a string; float fields accept numeric strings
    assert cfg.optimizer.lr == pytest.approx(3e-6) and isinstance(cfg.optimizer.lr, float)
    data = apply_overrides({"x": {"y": 1}}, ["x.y=2", "x.y=5", "new.deep.key=1"])
    assert data == {"x": {"y": 5}, "new": {"deep": {"key": 1}}}


def test_integers_with_a_leading_zero_are_refused_not_read_as_octal(tmp_path):
    """YAML 1.1 reads 0120 as 80 and 1:20 as 80: refused in files and overrides alike, naming
    the value it would have been; quoted, it is a string."""
    with pytest.raises(ConfigError, match=r"training.iterations: .*'0120' would be read as 80"):
        load_config(None, ["training.iterations=0120"])
    with pytest.raises(ConfigError, match=r"'1:20' would be read as 80"):
        load_config(None, ["training.iterations=1:20"])
    path = _write(tmp_path / "c.yaml", "training:\n  seed: 007\n")
    with pytest.raises(ConfigError, match=r"'007' would be read as 7 .*leading zero"):
        load_config(path)
    path = _write(tmp_path / "d.yaml", "name: '007'\ntraining: {seed: 0, iterations: 0x10}\n")
    cfg = load_config(path, ["training.eval_interval=0", "rollout.max_decode_batch=1_000"])
    assert (cfg.name, cfg.training.seed, cfg.training.iterations) == ("007", 0, 16)
    assert cfg.rollout.max_decode_batch == 1000


@pytest.mark.parametrize("bad", ["loss.top_k", "=3", "loss..top_k=3"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({}, [bad])


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError) as err:
        apply_overrides({"loss": {"top_k": 4}}, ["loss.top_k.x=1"])
    assert "loss.top_k" in _problems(err.value)


def test_unknown_keys_name_the_path_and_suggest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.entropy_treshold=0.5", "rollot.top_p=0.9", "zzz=1"])
    probs = _problems(err.value)
    assert "did you mean 'entropy_threshold'" in probs["loss.entropy_treshold"]
    assert "did you mean 'rollout'" in probs["rollot"]
    assert "unknown key" in probs["zzz"] and "known keys" in probs["zzz"]
    # the message lists every problem with its path
    text = str(err.value)
    for path in probs:
        assert path in text
    # a key of another section is named there, not matched to a near name of this one
    # ("training.warmup_iterations: did you mean 'iterations'?" would change the run's length)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.warmup_iterations=10", "model.student.tp=2"])
    probs = _problems(err.value)
    assert "another section: " in probs["training.warmup_iterations"]
    assert "optimizer.warmup_iterations" in probs["training.warmup_iterations"]
    assert "'iterations'" not in probs["training.warmup_iterations"]
    assert "parallel.student.tp" in probs["model.student.tp"]


def test_names_peers_use_are_told_our_key():
    """verl / TRL / Megatron names get this project's key, in the section the name was written
    in (eval.samples_per_prompt is eval.k, not rollout.samples_per_prompt)."""
    from megatron_eaopd.config.key_names import PEER_NAMES, _schema_paths

    assert set(PEER_NAMES.values()) <= set(_schema_paths())  # every target is a real key
    assert not set(PEER_NAMES) & set(_schema_paths())  # no name shadows a real key
    asked = {"eval.samples_per_prompt": "eval.k", "loss.alpha": "loss.fkl_coef",
             "rollout.n": "rollout.samples_per_prompt", "training.train_iters":
             "training.iterations", "optimizer.learning_rate": "optimizer.lr"}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{k}=1" for k in asked])
    probs = _problems(err.value)
    for written, ours in asked.items():
        assert probs[written].startswith(f"unknown key; this project calls it {ours}")
    # Megatron and TRL count optimizer steps; an iteration here is several
    assert (
        "one iteration is rollout.prompts_per_iteration / rollout.mini_batch_size optimizer "
        "steps" in probs["training.train_iters"]
    )
    assert probs["optimizer.learning_rate"] == "unknown key; this project calls it optimizer.lr"
    with pytest.raises(ConfigError) as err:  # a peer's name in another section, one key
        load_config(None, ["training.lr_warmup_iters=3", "rollout.k=3", "optimizer.warmup_steps=3"])
    probs = _problems(err.value)
    assert probs["training.lr_warmup_iters"].startswith(
        "unknown key; this project calls it optimizer.warmup_iterations, which counts optimizer "
        "steps"
    )
    assert probs["optimizer.warmup_steps"] == probs["training.lr_warmup_iters"]
    assert "another section: eval.k" in probs["rollout.k"]  # a real key first, not loss.top_k
    # a peer's key for what EOPD does not have: the reason, not a near spelling
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["loss.kl_coef=0.1", "training.eval_iters=10", "loss.lmbda=0.5", "loss.beta=0.1"]
        )
    probs = _problems(err.value)
    assert probs["loss.kl_coef"].startswith("unknown key: verl's kl_coef weights a KL penalty")
    assert "did you mean" not in probs["loss.kl_coef"]
    assert "number of evaluation batches" in probs["training.eval_iters"]
    assert "on-policy throughout" in probs["loss.lmbda"]
    assert "TRL GKD's beta is loss.jsd_beta" in probs["loss.beta"]


def test_type_range_and_choice_errors():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "rollout.mini_batch_size=abc",
                "logging.jsonl=1",
                "model.student.layers=2.5",
                "rollout.top_p=1.5",
                "task.eval_files=x.jsonl",
                "loss=3",
            ],
        )
    probs = _problems(err.value)
    assert "expected an integer" in probs["rollout.mini_batch_size"]
    assert "expected true or false" in probs["logging.jsonl"]
    assert "expected an integer" in probs["model.student.layers"]
    assert "out of range" in probs["rollout.top_p"] and "<= 1" in probs["rollout.top_p"]
    assert "expected a list" in probs["task.eval_files"]
    assert "expected a section" in probs["loss"]


def test_range_and_choice_errors_in_a_valid_section():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.clip=-0.1", "loss.objective=eopdd", "loss.top_k=0",
                           "eval.temperature=1e-40"])  # fmt: skip
    probs = _problems(err.value)
    assert ">= 1e-06" in probs["eval.temperature"]  # 1/T overflows fp32 below it
    assert "out of range" in probs["loss.clip"] and "> 0" in probs["loss.clip"]
    assert "did you mean 'eopd'" in probs["loss.objective"]
    assert ">= 1" in probs["loss.top_k"]


def test_cross_field_rules():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "rollout.prompts_per_iteration=100",
                "rollout.mini_batch_size=32",
                "parallel.student.tp=8",
                "parallel.teacher.pp=3",
                "model.teacher.max_seq_len=64",
                "task.name=not_a_path",
            ],
        )
    probs = _problems(err.value)
    assert "must divide" in probs["rollout.mini_batch_size"]
    assert "tp=8" in probs["parallel.student.tp"]
    assert "is not divisible by pp=3" in probs["parallel.teacher.pp"]
    assert "shorter than" in probs["model.teacher.max_seq_len"]
    assert "module:Class" in probs["task.name"]


def test_token_budget_must_hold_the_longest_rollout_row():
    base = ["rollout.max_prompt_tokens=10", "rollout.max_response_tokens=21"]
    cfg = load_config(None, [*base, "rollout.micro_batch_tokens=31"])
    assert cfg.rollout.micro_batch_tokens == 31
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, "rollout.micro_batch_tokens=30"])
    problem = _problems(err.value)["rollout.micro_batch_tokens"]
    assert "below the longest rollout row" in problem and "at least 31" in problem
    # sequence parallelism pads every row to a multiple of tp
    sp = [*base, "parallel.student.tp=2", "parallel.sequence_parallel=true"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*sp, "rollout.micro_batch_tokens=31"])
    problem = _problems(err.value)["rollout.micro_batch_tokens"]
    assert "= 31, rounded up to 32 for sequence_parallel (tp=2)" in problem
    assert "at least 32" in problem
    assert load_config(None, [*sp, "rollout.micro_batch_tokens=32"]).rollout.micro_batch_tokens
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.micro_batch_tokens=0"])
    assert ">= 1" in _problems(err.value)["rollout.micro_batch_tokens"]


def test_derived_fields():
    cfg = load_config(
        None,
        [
            "rollout.max_prompt_tokens=10",
            "rollout.max_response_tokens=20",
            "eval.max_response_tokens=30",
            "loss.entropy_threshold=0.5",
        ],
    )
    assert cfg.model.student.max_seq_len == 40 and cfg.model.teacher.max_seq_len == 40
    assert cfg.eval.entropy_threshold == 0.5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path, ["training.seed=7", *hf_overrides(path, str(tmp_path / "hf"))])
    out = save_resolved(cfg, tmp_path / "resolved" / "config.yaml")
    saved = yaml.safe_load(out.read_text())
    assert "defaults" not in saved
    assert saved == config_to_dict(cfg)
    again = load_config(out)
    assert again == cfg
    assert again.training.seed == 7


def test_paper_configs_carry_the_paper_hyperparameters(tmp_path):
    for name in ("0.6b", "1.7b", "4b"):
        (path,) = (REPO / "configs").glob(f"qwen3-8b-to-{name}-*.yaml")
        cfg = load_config(path, hf_overrides(path, str(tmp_path)))
        assert cfg.loss.objective == "eopd"
        assert (cfg.loss.entropy_threshold, cfg.loss.fkl_coef, cfg.loss.top_k) == (0.8, 1.0, 16)
        assert cfg.loss.clip == 0.2 and cfg.loss.temperature == 1.0
        assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (3e-6, 0.01)
        assert cfg.optimizer.lr_schedule == "cosine"
        r = cfg.rollout
        assert (r.prompts_per_iteration, r.mini_batch_size, r.samples_per_prompt) == (128, 32, 1)
        assert (r.max_prompt_tokens, r.max_response_tokens, r.temperature, r.top_p) == (
            1024,
            4096,
            1.0,
            1.0,
        )
        assert (cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p) == (8, 1.0, 0.8)
        assert cfg.eval.max_response_tokens == 8192
        assert cfg.model.teacher.layers == 36 and cfg.model.teacher.hidden == 4096
        assert "boxed" in cfg.task.prompt_suffix
        m = re.search(r"tp(\d+)pp(\d+)", path.name)
        assert (cfg.parallel.student.tp, cfg.parallel.student.pp) == tuple(map(int, m.groups()))
        # the shapes come from the HF folders' config.json; the paper's teacher is non-thinking
        assert cfg.model.student.qk_layernorm and cfg.model.student.tied_embeddings
        assert cfg.tokenizer.kind == "huggingface" and cfg.tokenizer.path == cfg.model.teacher_hf
        assert cfg.tokenizer.chat_template and cfg.tokenizer.enable_thinking is False
        assert cfg.training.export_hf
    path = REPO / "configs/qwen3-8b-to-4b-1n8g-tp2pp2.yaml"
    assert load_config(path, hf_overrides(path, str(tmp_path))).training.epochs == 2


def test_tiny_cpu_configs():
    """The main job runs data-parallel with the exact form; its TP 2 sibling is the paper's
    sampled form, vocab-parallel, on the same task and models."""
    main = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert main.parallel.student.tp == 1 and main.parallel.teacher.tp == 1
    assert main.loss.form == "exact" and main.student_prep.enabled
    tp2 = load_config(REPO / "configs" / "tiny-cpu-tp2.yaml")
    assert tp2.parallel.student.tp == 2 and tp2.parallel.teacher.tp == 2
    assert tp2.loss.form == "sampled"
    for cfg in (main, tp2):
        assert cfg.parallel.backend == "gloo" and cfg.task.name == "builtin"
        assert cfg.model.student.dtype == "fp32" and cfg.teacher_prep.enabled
    assert main.model == tp2.model and main.task == tp2.task
    assert main.teacher_prep == tp2.teacher_prep


def test_every_field_documented_and_in_docs():
    rows = describe_fields()
    missing = [path for path, _, _, doc in rows if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    leaves = [f.name for f in dataclasses.fields(EAOPDConfig)]
    assert len(rows) > len(leaves)
    docs = (REPO / "docs" / "configs.md").read_text()
    absent = [path for path, *_ in rows if f"`{path}`" not in docs]
    assert not absent, f"docs/configs.md misses: {absent} (regenerate it, see the file's header)"


def test_docs_reference_is_current():
    from megatron_eaopd.config.__main__ import reference_markdown

    docs = (REPO / "docs" / "configs.md").read_text()
    section = docs.split("<!-- BEGIN REFERENCE -->\n", 1)[1].split("<!-- END REFERENCE -->", 1)[0]
    assert section == reference_markdown(), (
        "regenerate: python -m megatron_eaopd.config --reference"
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_model_shapes_build_model_configs(path, tmp_path):
    """The shapes translate into the model builder's ModelConfig (the trainer's own
    translation, config.json for HF folders) and split over their layouts."""
    from megatron_eaopd.trainer.build import model_configs

    div = ["parallel.make_vocab_size_divisible_by=64"]  # not the default: it must reach both
    cfg = load_config(path, hf_overrides(path, str(tmp_path)) + div)
    built = dict(zip(("student", "teacher"), model_configs(cfg, 320)))
    for who in ("student", "teacher"):
        shape, mc = getattr(cfg.model, who), built[who]
        assert mc.num_layers == shape.layers and mc.tied_embeddings == shape.tied_embeddings
        assert mc.hidden_size == shape.hidden and mc.kv_channels == shape.kv_channels
        assert mc.vocab_size == (shape.vocab_size or 320)
        assert mc.make_vocab_size_divisible_by == 64
        assert mc.params_dtype == {"fp32": "float32", "bf16": "bfloat16"}[shape.dtype]
        layout = getattr(cfg.parallel, who)
        mc.check_layout(layout.tp, layout.pp, layout.vpp, name=who)


@pytest.mark.parametrize(
    "objective", ["opd", "eopd", "eopd_exact", "eopd_soft", "mix", "fkl", "jsd"]
)
def test_loss_section_builds_objective_config(objective):
    from megatron_eaopd.config import objective_kwargs
    from megatron_eaopd.losses import objectives

    cfg = load_config(REPO / "configs" / "tiny-cpu-tp2.yaml", [f"loss.objective={objective}"])
    expected_form = "exact" if objective in ("eopd_exact", "jsd") else "sampled"
    assert cfg.loss.form == expected_form
    oc = objectives.ObjectiveConfig(**objective_kwargs(cfg.loss))
    assert oc.form == expected_form and oc.top_k == cfg.loss.top_k
    assert oc.entropy_threshold == cfg.loss.entropy_threshold and oc.clip_eps == cfg.loss.clip
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.objective=jsd", "loss.form=sampled"])
    assert "needs form exact" in _problems(err.value)["loss.form"]


def test_teacher_source_rules(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["teacher_prep.enabled=false"])
    assert "teacher would be untrained" in _problems(err.value)["model.teacher_checkpoint"]
    assert load_config(None, ["teacher_prep.enabled=false", "model.teacher_checkpoint=ckpt/t"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["task.name=jsonl", "task.distill_file=d.jsonl"])
    assert "teacher_prep needs" in _problems(err.value)["task.train_file"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["task.synthetic.num_distill=64"])
    assert (
        "exceeds task.synthetic.num_distill=64"
        in _problems(err.value)["rollout.prompts_per_iteration"]
    )
