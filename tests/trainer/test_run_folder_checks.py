"""What the trainer refuses or does about the run folder before any compute: one live run per
``training.output_dir``; a resume under settings that change what it trains, shorter than the saved
run or longer than its decaying schedule planned; checkpoint folders without ``latest``, moved,
taken from another run or given as the run folder; the export folder never replacing the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_eaopd.config import load_config
from megatron_eaopd.trainer.loop import check_trainer_config
from tests.trainer.common import TINY_CPU, tiny_config

TINY = Path(TINY_CPU)


def _fake_save(root, name="iter_0000004", extra=None, latest=True) -> Path:
    """A checkpoint folder whose files look whole to the early checks (eaopd_meta.json and
    dist_checkpointing's metadata.json; no tensors): what check_output_dir reads."""
    import json

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"iteration": int(name.split("_")[1]), "extra": extra or {}}
    (folder / "eaopd_meta.json").write_text(json.dumps(meta))
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (folder / "common.pt").write_bytes(b"")
    if latest:
        (Path(root) / "latest").write_text(name + "\n")
    return folder


def test_one_run_per_output_folder(tmp_path):
    """A fresh start (resume: false) over a saved run, or a resume under other settings, is
    refused; a resume with the same settings, or other evaluation / logging settings, is not."""
    from megatron_eaopd.config import save_resolved
    from megatron_eaopd.trainer.loop import check_output_dir

    out = tmp_path / "run"
    derived = ["model.student.max_seq_len=0", "model.teacher.max_seq_len=0"]  # from the limits
    cfg = load_config(TINY, [*derived, f"training.output_dir={out}"])
    check_output_dir(cfg)  # nothing there yet
    _fake_save(out / "checkpoints")
    save_resolved(cfg, str(out / "config.yaml"))
    check_output_dir(cfg)
    check_output_dir(load_config(TINY, [*derived, f"training.output_dir={out}", "eval.k=4",
                                        "training.checkpoint_interval=5"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"training.resume=false, but .* holds a run "
                                         r"\(iter_0000004\)"):  # fmt: skip
        check_output_dir(
            load_config(TINY, [*derived, f"training.output_dir={out}", "training.resume=false"])
        )
    # derived lengths and the loss kernels' chunking may change
    free = ["loss.chunk_size=64", "eval.max_response_tokens=200"]
    check_output_dir(load_config(TINY, [*derived, f"training.output_dir={out}", *free]))
    # the built-in task draws its other splits after the eval set; the padded vocabulary is
    # the model's shape
    for key, change in (("task.synthetic.num_eval", "32"),
                        ("parallel.make_vocab_size_divisible_by", "64")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"holds a run .* other settings: {key}: "):
            check_output_dir(load_config(TINY, [*derived, f"training.output_dir={out}",
                                                f"{key}={change}"]))  # fmt: skip
    other = load_config(TINY, [*derived, f"training.output_dir={out}", "loss.objective=opd",
                               "optimizer.lr=1e-5"])  # fmt: skip
    with pytest.raises(ValueError) as err:
        check_output_dir(other)
    text = str(err.value)
    assert "loss.objective: 'eopd' -> 'opd'" in text and "optimizer.lr: 0.001 -> 1e-05" in text
    assert "Use a new training.output_dir" in text
    # a config.yaml this version cannot read (an older run's keys) is not compared
    (out / "config.yaml").write_text("loss: {old_key: 1}\n")
    check_output_dir(other)


def test_a_fresh_start_over_an_attempt_without_checkpoint_needs_its_settings(tmp_path):
    """A folder whose earlier launch died before its first checkpoint (config.yaml, records, no
    checkpoint): a new start under other run settings is refused, as a changed resume is; with
    the same settings, or other evaluation / logging settings, it is accepted (the trainer moves
    the records aside)."""
    from megatron_eaopd.config import save_resolved
    from megatron_eaopd.trainer.loop import check_output_dir

    out = tmp_path / "run"
    derived = ["model.student.max_seq_len=0", "model.teacher.max_seq_len=0"]

    def cfg(*extra):
        return load_config(TINY, [*derived, f"training.output_dir={out}", *extra])

    save_resolved(cfg(), str(out / "config.yaml"))
    (out / "metrics.jsonl").write_text('{"split": "train", "iteration": 1}\n')
    for same in ((), ("eval.k=4", "logging.tensorboard=false"), ("training.resume=false",)):
        check_output_dir(cfg(*same))
    with pytest.raises(ValueError) as err:
        check_output_dir(cfg("training.seed=7", "loss.objective=opd"))
    text = str(err.value)
    assert f"training.output_dir={out} holds an earlier launch" in text
    assert "training.seed: 42 -> 7" in text and "loss.objective: 'eopd' -> 'opd'" in text
    assert "Use a new training.output_dir" in text


def test_a_resume_shorter_than_the_saved_run_is_refused(tmp_path):
    import json
    from types import SimpleNamespace

    from megatron_eaopd.models.checkpoint import META
    from megatron_eaopd.trainer.run_dir import length_problem as _length_problem

    out = tmp_path / "run"
    data = SimpleNamespace(distill=list(range(64)))

    def cfg(*extra):  # no warm-up: a 1-iteration run has 4 optimizer steps
        return load_config(TINY, [f"training.output_dir={out}", "optimizer.warmup_iterations=0",
                                  *extra])  # fmt: skip

    def saved(iteration):  # a checkpoint's meta (no planned length) and the latest marker
        folder = out / "checkpoints" / f"iter_{iteration:07d}"
        folder.mkdir(parents=True)
        (folder / META).write_text(json.dumps({"iteration": iteration, "extra": {}}))
        (out / "checkpoints" / "latest").write_text(f"iter_{iteration:07d}\n")

    assert _length_problem(cfg("training.iterations=1"), data) is None  # nothing saved
    saved(2)
    text = _length_problem(cfg("training.iterations=1"), data)
    assert "saved at iteration 2 (iter_0000002), beyond this run's length of 1" in text
    assert "Set training.iterations to 2 or more" in text and "1 iteration (" in text
    assert _length_problem(cfg("training.iterations=2"), data) is None  # finished: fine
    assert _length_problem(cfg("training.iterations=1", "training.resume=false"), data) is None
    # by epochs: 64 prompts / 32 per iteration x 1 epoch = 2 iterations; 16 per iteration: 4
    epochs = ["training.iterations=null", "training.epochs=1", "rollout.mini_batch_size=16"]
    assert _length_problem(cfg(*epochs, "rollout.prompts_per_iteration=32"), data) is None
    saved(3)
    text = _length_problem(cfg(*epochs, "rollout.prompts_per_iteration=32"), data)
    assert "length of 2 iterations (training.epochs=1" in text
    assert _length_problem(cfg(*epochs, "rollout.prompts_per_iteration=16"), data) is None


def test_a_resume_longer_than_a_decaying_schedule_planned_is_refused(tmp_path):
    """Extending a finished cosine run: megatron's scheduler continues as saved, so the new
    iterations ran at min_lr (0: nothing trained); refused. Shorter, or a constant schedule,
    or a checkpoint that records no plan, is allowed."""
    import json
    from types import SimpleNamespace

    from megatron_eaopd.models.checkpoint import META
    from megatron_eaopd.trainer.run_dir import length_problem as _length_problem

    out = tmp_path / "run"
    data = SimpleNamespace(distill=list(range(64)))
    saved = out / "checkpoints" / "iter_0000002"
    saved.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("iter_0000002\n")
    (saved / META).write_text(json.dumps({"extra": {"total_iterations": 2}}))

    def problem(*extra):
        cfg = load_config(TINY, [f"training.output_dir={out}", *extra])
        return _length_problem(cfg, data)

    text = problem("training.iterations=4")
    assert "a run planned for 2 iterations; this config asks for 4" in text
    assert "iterations 3..4 would run at optimizer.min_lr=0.0" in text
    assert problem("training.iterations=2") is None
    assert problem("training.iterations=4", "optimizer.lr_schedule=constant") is None
    (saved / META).write_text(json.dumps({"extra": {}}))
    assert problem("training.iterations=4") is None
    # a shorter resume (2 of a 4-iteration schedule) saved: the schedule still runs to 4
    (saved / META).write_text(json.dumps({"extra": {"total_iterations": 2,
                                                    "planned_iterations": 4}}))  # fmt: skip
    assert problem("training.iterations=4") is None
    assert "planned for 4 iterations; this config asks for 6" in problem("training.iterations=6")


def test_a_saved_config_is_compared_even_where_todays_rules_refuse_it(tmp_path):
    """The folder's config.yaml is read back without the cross-field rules: one an older
    version accepted (logging.jsonl off with eval.plot on) still guards the resume."""
    from megatron_eaopd.config.loader import save_resolved
    from megatron_eaopd.trainer.checks import check_output_dir

    out = tmp_path / "run"
    old = load_config(TINY, [f"training.output_dir={out}", "eval.plot=false"])
    old.eval.plot, old.logging.jsonl = True, False  # as an older version saved it
    save_resolved(old, out / "config.yaml")
    _fake_save(out / "checkpoints", "iter_0000002")
    now = load_config(TINY, [f"training.output_dir={out}", "eval.plot=false",
                             "logging.jsonl=false", "loss.objective=opd"])  # fmt: skip
    with pytest.raises(ValueError, match="loss.objective: 'eopd' -> 'opd'"):
        check_output_dir(now)


def test_eval_files_may_change_on_resume_only_where_nothing_trained_reads_them(tmp_path):
    """A task-trained tokenizer learns from the eval prompts and a teacher prepared on the task
    is keyed by them: a resume with other eval files would train on other ids or teacher."""
    from megatron_eaopd.trainer.checks import _eval_files_free

    cfg = load_config(TINY)
    assert cfg.tokenizer.kind == "task" and not _eval_files_free(cfg)
    cfg.tokenizer.kind = "huggingface"
    assert not _eval_files_free(cfg)  # the teacher is still prepared on the task
    cfg.teacher_prep.enabled = False
    assert _eval_files_free(cfg)
    cfg.teacher_prep.enabled, cfg.model.teacher_hf = True, str(tmp_path)
    assert _eval_files_free(cfg)


def test_a_moved_checkpoint_folder_does_not_restart_the_run(tmp_path):
    """training.checkpoint_dir changed away from the run's checkpoints (the default folder, or
    the one its config.yaml names): a fresh start would rewrite the run's metrics; refused,
    naming the folder to set."""
    from megatron_eaopd.config import save_resolved
    from megatron_eaopd.trainer.loop import check_output_dir

    out = tmp_path / "run"
    derived = ["model.student.max_seq_len=0", "model.teacher.max_seq_len=0"]
    cfg = load_config(TINY, [*derived, f"training.output_dir={out}"])
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("iter_0000001\n")
    save_resolved(cfg, str(out / "config.yaml"))
    moved = load_config(TINY, [*derived, f"training.output_dir={out}",
                               f"training.checkpoint_dir={tmp_path / 'elsewhere'}"])  # fmt: skip
    with pytest.raises(ValueError, match=rf"checkpoints are in {out / 'checkpoints'}, but "):
        check_output_dir(moved)
    # the run's config.yaml names its own checkpoint folder: the default one is elsewhere
    (out / "checkpoints").rename(tmp_path / "ckpt")
    save_resolved(load_config(TINY, [*derived, f"training.output_dir={out}",
                                     f"training.checkpoint_dir={tmp_path / 'ckpt'}"]),
                  str(out / "config.yaml"))  # fmt: skip
    with pytest.raises(ValueError, match=rf"Set training.checkpoint_dir={tmp_path / 'ckpt'} "):
        check_output_dir(cfg)
    (tmp_path / "ckpt" / "latest").unlink()  # nothing saved there any more: a fresh start
    check_output_dir(cfg)


def test_the_export_folder_never_replaces_the_run_or_foreign_files(tmp_path):
    out = tmp_path / "run"
    base = [f"training.output_dir={out}"]
    for export in (out, tmp_path):  # the run folder itself, or a folder above it
        cfg = load_config(TINY, [*base, f"training.export_hf={export}"])
        with pytest.raises(ValueError, match=r"would replace training.output_dir"):
            check_trainer_config(cfg, 2)
    # the run's own subfolders, or inside its checkpoint folder (before they exist)
    for export, what in ((out / "checkpoints", "the checkpoint folder"),
                         (out / "checkpoints" / "hf", "the checkpoint folder"),
                         (out / "tensorboard", "TensorBoard")):  # fmt: skip
        cfg = load_config(TINY, [*base, f"training.export_hf={export}"])
        with pytest.raises(ValueError, match=f"would replace .*{what}"):
            check_trainer_config(cfg, 2)
    mine = tmp_path / "student-hf"
    cfg = load_config(TINY, [*base, f"training.export_hf={mine}"])
    check_trainer_config(cfg, 2)  # new
    mine.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (mine / name).write_text("{}")
    # a model saved by another tool (no marker, a config.json not of our export): kept
    with pytest.raises(ValueError, match=r"is not an export of this project"):
        check_trainer_config(cfg, 2)
    (mine / "eaopd_export.json").write_text('{"written_by": "megatron-eaopd save_hf_weights"}')
    check_trainer_config(cfg, 2)  # an earlier export: replaced at the end
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds more than a Hugging Face export \(notes.txt\)"):
        check_trainer_config(cfg, 2)


def test_a_run_does_not_take_over_another_runs_checkpoint_folder(tmp_path):
    """Two run folders pointed at one training.checkpoint_dir while the first still exists: the
    second would resume the first's run; refused, with or without its own config.yaml. The
    owning folder itself, a moved run (its old folder gone), checkpoints copied into a run's
    default checkpoint folder and saves that record no owner (older versions) are accepted."""
    import json
    import shutil

    from megatron_eaopd.config import save_resolved
    from megatron_eaopd.trainer.loop import check_output_dir

    derived = ["model.student.max_seq_len=0", "model.teacher.max_seq_len=0"]
    ckpt = tmp_path / "shared"
    meta = _fake_save(ckpt, extra={"output_dir": str(tmp_path / "a")}) / "eaopd_meta.json"

    def cfg(out, shared=True):
        extra = [f"training.checkpoint_dir={ckpt}"] if shared else []
        return load_config(TINY, [*derived, *extra, f"training.output_dir={out}"])

    owner = cfg(tmp_path / "a")
    save_resolved(owner, str(tmp_path / "a" / "config.yaml"))
    check_output_dir(owner)
    check_output_dir(cfg(f"{tmp_path}/x/../a"))  # the same folder, spelled otherwise
    owned = r"holds checkpoints of the run in .*/a \(iter_0000004\).*Give this run its own"
    with pytest.raises(ValueError, match=owned):
        check_output_dir(cfg(tmp_path / "b"))  # a new run folder
    save_resolved(cfg(tmp_path / "c"), str(tmp_path / "c" / "config.yaml"))
    with pytest.raises(ValueError, match=owned):
        check_output_dir(cfg(tmp_path / "c"))  # another run's folder, same settings
    # checkpoints copied into a new run's default folder (forking a run): accepted
    shutil.copytree(ckpt, tmp_path / "fork" / "checkpoints")
    check_output_dir(cfg(tmp_path / "fork", shared=False))
    # the run moved away (its old folder no longer exists): accepted
    (tmp_path / "a" / "config.yaml").rename(tmp_path / "a.yaml")
    check_output_dir(cfg(tmp_path / "b"))
    (tmp_path / "a.yaml").rename(tmp_path / "a" / "config.yaml")
    meta.write_text(json.dumps({"iteration": 4, "extra": {}}))  # saved by an older version
    check_output_dir(cfg(tmp_path / "b"))


def test_checkpoints_without_latest_or_a_broken_latest_are_refused_naming_the_way_on(tmp_path):
    """Complete saves without a `latest` marker (deleted, or copied in by hand) used to start the
    run afresh over them; a latest save with a cut-short eaopd_meta.json or no metadata.json
    failed after both models were built, with a raw traceback and advice the trainer has no
    setting for. Both are refused before any compute, naming the earlier complete save."""
    from megatron_eaopd.trainer.loop import check_output_dir

    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    cfg = tiny_config(tmp_path, f"training.output_dir={out}")
    _fake_save(ckpt, "iter_0000002", latest=False)
    _fake_save(ckpt, "iter_0000004", latest=False)
    with pytest.raises(ValueError) as err:
        check_output_dir(cfg)
    text = str(err.value)
    assert "holds complete checkpoints (iter_0000002, iter_0000004) but no 'latest'" in text
    assert f"echo iter_0000004 > {ckpt / 'latest'}" in text
    (ckpt / "latest").write_text("iter_0000004\n")
    check_output_dir(cfg)  # whole
    meta = ckpt / "iter_0000004" / "eaopd_meta.json"
    meta.write_text(meta.read_text()[:7])  # cut short
    back = f"echo iter_0000002 > {ckpt / 'latest'}"
    with pytest.raises(ValueError, match=r"cannot be resumed from \(unreadable eaopd_meta.json"):
        check_output_dir(cfg)
    _fake_save(ckpt, "iter_0000004")
    (ckpt / "iter_0000004" / "metadata.json").unlink()
    with pytest.raises(ValueError, match="no readable metadata.json") as err:
        check_output_dir(cfg)
    assert back in str(err.value)
    (ckpt / "latest").write_text("iter_0000006\n")  # names a save that is gone
    with pytest.raises(ValueError, match=r"iter_0000006 cannot be resumed from \(missing"):
        check_output_dir(cfg)
    (ckpt / "latest").write_text("iter_0000002\n")
    (ckpt / "iter_0000002" / "metadata.json").unlink()
    with pytest.raises(ValueError, match="there is no earlier complete checkpoint"):
        check_output_dir(cfg)


def test_this_runs_own_unmarked_save_is_marked_and_resumed(tmp_path, monkeypatch):
    """A kill between a save's rename and its `latest` (the first save of a run) leaves a
    complete save of this run folder without a marker: the requeue must resume it, not stop for
    a hand-written marker. Rank 0 writes the marker; another rank only passes the check."""
    from megatron_eaopd.trainer.loop import check_output_dir

    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    cfg = tiny_config(tmp_path, f"training.output_dir={out}")
    _fake_save(ckpt, "iter_0000003", extra={"output_dir": str(out)}, latest=False)
    monkeypatch.setenv("RANK", "1")
    check_output_dir(cfg)
    assert not (ckpt / "latest").exists()
    monkeypatch.setenv("RANK", "0")
    fresh = tiny_config(tmp_path, f"training.output_dir={out}", "training.resume=false")
    with pytest.raises(ValueError, match="holds complete checkpoints"):  # nothing marked
        check_output_dir(fresh)
    assert not (ckpt / "latest").exists()
    check_output_dir(cfg)
    assert (ckpt / "latest").read_text() == "iter_0000003\n"


def test_settings_are_compared_with_the_checkpoints_record_when_config_yaml_is_gone(tmp_path):
    """The run folder deleted (or a new one given) next to the saved checkpoints: the settings
    check had nothing to compare with, and the saved run went on under other settings."""
    from megatron_eaopd.config import config_to_dict
    from megatron_eaopd.trainer.loop import check_output_dir

    ckpt = tmp_path / "ckpt"
    derived = ["model.student.max_seq_len=0", "model.teacher.max_seq_len=0"]
    saved = tiny_config(tmp_path, *derived, f"training.checkpoint_dir={ckpt}")
    _fake_save(ckpt, extra={"config": config_to_dict(saved)})
    check_output_dir(saved)  # the same settings: a resume
    check_output_dir(tiny_config(tmp_path, *derived, f"training.checkpoint_dir={ckpt}", "eval.k=2"))
    other = tiny_config(tmp_path, *derived, f"training.checkpoint_dir={ckpt}", "loss.objective=opd",
                  "optimizer.lr=5e-4")  # fmt: skip
    with pytest.raises(ValueError) as err:
        check_output_dir(other)
    text = str(err.value)
    assert "loss.objective: 'eopd' -> 'opd'" in text and "optimizer.lr: 0.001 -> 0.0005" in text


def test_a_run_folder_given_as_a_checkpoint_root_names_its_checkpoints_folder(tmp_path):
    """eaopd-convert export-hf --checkpoint runs/x said to pass "the directory of a saved run",
    which runs/x is; the saves are in runs/x/checkpoints."""
    from megatron_eaopd.models.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    _fake_save(run / "checkpoints", "iter_0000002")
    with pytest.raises(FileNotFoundError, match=r"looks like a run folder: its checkpoints are in"):
        resolve_checkpoint(str(run))
    assert resolve_checkpoint(str(run / "checkpoints")).endswith("iter_0000002")
    (run / "checkpoints" / "latest").write_text("iter_0000009\n")
    with pytest.raises(FileNotFoundError, match=r"Complete ones: \['iter_0000002'\]; write one"):
        resolve_checkpoint(str(run / "checkpoints"))
