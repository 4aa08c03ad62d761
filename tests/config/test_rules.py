"""The cross-section rules checked at load (``config.rules``): model layouts, the warm-up against
the run's optimizer steps, preparations that train nothing, task keys the chosen task does not
read, plots without metrics.jsonl. The CLI cases (exit status 2) are in test_checks.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_eaopd.config import ConfigError, load_config
from megatron_eaopd.config.rules import (
    loss_key_problems,
    optimizer_steps,
    rule_problems,
    unread_loss_warning,
    warmup_problems,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu.yaml"
# a jsonl task: its prompt count is known only once the files are read
JSONL = ["task.name=jsonl", "task.distill_file=d.jsonl", "task.train_file=t.jsonl"]


def _problems(overrides, path=TINY) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return dict(err.value.problems)


def test_layouts_of_both_models_are_checked_at_load():
    """ffn_hidden is split over tp too: 385 at tp 2 used to fail in build_model, after the
    teacher's preparation."""
    probs = _problems(["model.student.ffn_hidden=385", "parallel.student.tp=2",
                       "parallel.teacher.tp=2", "model.teacher.layers=3",
                       "parallel.teacher.pp=2"])  # fmt: skip
    assert "model.student.ffn_hidden=385 is not divisible by tp=2" in probs["parallel.student.tp"]
    assert "choose tp among [1]" in probs["parallel.student.tp"]
    assert "model.teacher.layers=3 is not divisible by pp=2" in probs["parallel.teacher.pp"]
    load_config(TINY, ["parallel.student.tp=2", "parallel.teacher.tp=2"])


def test_warmup_is_bounded_by_the_runs_optimizer_steps():
    cfg = load_config(TINY, ["training.iterations=2", "optimizer.warmup_iterations=8"])
    assert optimizer_steps(cfg, None)[0] == 2 * 32 // 8
    probs = _problems(["training.iterations=2", "optimizer.warmup_iterations=9"])
    assert "9 exceeds the run's 8 optimizer steps" in probs["optimizer.warmup_iterations"]
    # epochs over the built-in task's num_distill (400 // 32 = 12 iterations x 4 steps)
    over = ["training.iterations=null", "training.epochs=1"]
    load_config(TINY, [*over, "optimizer.warmup_iterations=48"])
    probs = _problems([*over, "optimizer.warmup_iterations=49"])
    assert (
        "12 iterations (training.epochs=1.0 over 400 prompts)"
        in probs["optimizer.warmup_iterations"]
    )


def test_warmup_of_a_jsonl_run_is_checked_once_its_prompts_are_counted():
    cfg = load_config(None, [*JSONL, "optimizer.warmup_iterations=100"])  # count unknown: later
    assert warmup_problems(cfg, None) == []
    ((key, text),) = warmup_problems(cfg, 1000)  # 1000 // 128 = 7 iterations x 4 steps
    assert key == "optimizer.warmup_iterations" and "exceeds the run's 28 optimizer steps" in text
    assert warmup_problems(cfg, 4000) == []


def test_warmup_of_a_jsonl_run_is_refused_by_the_data_checks(tmp_path):
    from types import SimpleNamespace

    from megatron_eaopd.trainer import checks

    over = ["task.name=jsonl", "task.distill_file=d.jsonl", "model.teacher_checkpoint=x",
            f"training.output_dir={tmp_path}"]  # fmt: skip
    data = SimpleNamespace(distill=[None] * 1000, vocab_size=300)
    checks.check_data_config(load_config(None, over), data, 1)
    cfg = load_config(None, [*over, "optimizer.warmup_iterations=100"])
    with pytest.raises(ValueError, match=r"optimizer.warmup_iterations: 100 exceeds the run's 28"):
        checks.check_data_config(cfg, data, 1)


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_a_preparation_that_would_train_nothing_is_refused(who):
    probs = _problems([f"{who}_prep.iterations=0"])
    assert f"{who}_prep.iterations >= 1" in probs[f"{who}_prep.iterations"]
    load_config(TINY, [f"{who}_prep.iterations=0", f"{who}_prep.enabled=false"]
                + (["model.teacher_checkpoint=somewhere"] if who == "teacher" else []))  # fmt: skip


def test_task_keys_the_task_does_not_read_are_refused():
    probs = _problems(["task.distill_file=x.jsonl", "task.eval_files=[a.jsonl]",
                       "task.train_file=t.jsonl", "task.prompt_suffix=' go'"])  # fmt: skip
    assert set(probs) == {"task.distill_file", "task.eval_files", "task.train_file",
                          "task.prompt_suffix"}  # fmt: skip
    assert "task.name=builtin" in probs["task.eval_files"]
    probs = _problems([*JSONL, "task.options={k: 1}"])
    assert "task.name=jsonl" in probs["task.options"] and "module:Class" in probs["task.options"]
    # jsonl ignores the built-in section its config inherits (tiny-cpu.yaml sets it)
    cfg = load_config(TINY, [*JSONL, "task.prompt_suffix=' go'"])
    assert cfg.task.synthetic.kind == "countdown"
    # a module:Class task may read any key (Class.from_config)
    load_config(TINY, ["task.name=pkg.mod:Task", "task.options={k: 1}", "task.eval_files=[a]"])


def test_plots_need_metrics_jsonl():
    probs = _problems(["logging.jsonl=false"])
    assert "eval.plot=false" in probs["logging.jsonl"]
    load_config(TINY, ["logging.jsonl=false", "eval.plot=false"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_break_no_rule(path, tmp_path):
    from tests.paper_configs import hf_overrides

    assert rule_problems(load_config(path, hf_overrides(path, str(tmp_path)))) == []


@pytest.mark.parametrize(
    "overrides, key, readers",
    [
        # tiny-cpu trains eopd in the exact form: PPO's clip and the top-k tail are not read
        (["loss.clip=0.01"], "loss.clip", "opd or eopd or eopd_soft or mix in the sampled form"),
        (["loss.tail_bucket=true"], "loss.tail_bucket", "or fkl in the sampled form"),
        (["loss.objective=opd", "loss.mix_weight=0.3"], "loss.mix_weight", "objective=mix)"),
        (["loss.objective=mix", "loss.fkl_coef=2"], "loss.fkl_coef", "eopd_exact)"),
        (["loss.soft_gate_width=0.3"], "loss.soft_gate_width", "objective=eopd_soft)"),
        (["loss.jsd_beta=0.3"], "loss.jsd_beta", "objective=jsd)"),
    ],
)
def test_loss_keys_the_objective_does_not_read_are_named(overrides, key, readers):
    """A sweep over loss.clip on tiny-cpu (the exact form) trained identical runs, silently.
    The trainer warns (a config setting loss.fkl_coef must still run objective opd for a
    comparison; an override cannot remove an inherited key); the plugin's flags are refused."""
    cfg = load_config(TINY, overrides)  # accepted
    text = dict(loss_key_problems(cfg))[key]
    assert "would be ignored" in text and readers in text
    warning = unread_loss_warning(cfg)
    assert warning.startswith(f"{key}=") and "without effect in this run" in warning
    on = {"loss.clip": ["loss.form=sampled"], "loss.tail_bucket": ["loss.form=sampled"],
          "loss.mix_weight": ["loss.objective=mix"], "loss.fkl_coef": ["loss.objective=eopd"],
          "loss.soft_gate_width": ["loss.objective=eopd_soft"],
          "loss.jsd_beta": ["loss.objective=jsd"]}[key]  # fmt: skip
    assert unread_loss_warning(load_config(TINY, [*overrides, *on])) is None  # read there


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["tokenizer.path=/data/spm.model"], "tokenizer.path", "tokenizer.kind=sentencepiece"),
        (["tokenizer.kind=task", "tokenizer.path=/t"], "tokenizer.path", "remove tokenizer.path"),
        (["rollout.pp_interleave=true"], "rollout.pp_interleave", "neither model is pipelined"),
    ],
)
def test_settings_only_another_setting_reads_are_refused_without_it(overrides, key, fix):
    """Each ran to exit 0 doing what the setting alone would not: a tokenizer trained on the task
    in place of the given file, no interleaving."""
    assert fix in _problems(overrides)[key]


def test_pp_interleave_under_nccl_is_warned_about():
    """Run on gloo only: the trainer's start warns where the backend is NCCL (nccl, or auto with
    CUDA), not on gloo or on a CPU machine."""
    from megatron_eaopd.config.rules import interleave_warning

    on = ["rollout.pp_interleave=true", "parallel.student.pp=2"]
    for backend, cuda, warned in (("auto", True, True), ("nccl", True, True),
                                  ("auto", False, False), ("gloo", True, False)):  # fmt: skip
        cfg = load_config(TINY, on + [f"parallel.backend={backend}"])
        text = interleave_warning(cfg, cuda_available=cuda)
        assert (text is not None) == warned, (backend, cuda)
        assert text is None or "has run on gloo only" in text
    off = load_config(TINY, ["parallel.student.pp=2", "parallel.backend=auto"])
    assert interleave_warning(off, cuda_available=True) is None


def test_selective_recompute_with_transformer_engine_is_warned_about():
    """Transformer Engine's fused attention keeps no [s, s] scores: selective saves nothing."""
    from megatron_eaopd.config.rules import recompute_warning

    selective = load_config(TINY, ["training.recompute=selective"])
    assert "saves nothing" in recompute_warning(selective, te=True)
    assert recompute_warning(selective, te=False) is None  # the local spec's softmax goes
    assert recompute_warning(load_config(TINY, ["training.recompute=full"]), te=True) is None


def test_settings_with_their_reader_are_accepted():
    load_config(TINY, ["rollout.pp_interleave=true", "parallel.student.pp=2"])
    load_config(TINY, ["rollout.pp_interleave=true", "parallel.teacher.pp=2"])  # its evaluation
    load_config(TINY, ["tokenizer.kind=sentencepiece", "tokenizer.path=/data/spm.model"])
