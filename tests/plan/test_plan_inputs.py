"""What eaopd-plan refuses or notes about its inputs (exit 2 with the message, never a confident
plan of another model or a layout the trainer refuses): checkpoints that record no shape, the
exact form's and virtual pipelines' layouts, presets that clash with given shape keys or that no
model uses, and a teacher folder downloaded before the student's."""

from __future__ import annotations

import os

import pytest

from megatron_eaopd.plan.cli import main
from tests.paper_configs import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(ROOT, "configs", "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml")
TINY = os.path.join(ROOT, "configs", "tiny-cpu.yaml")


def _err(capsys, *args) -> str:
    assert main(["--config", *args]) == 2
    return capsys.readouterr().err


def test_a_checkpoint_without_a_recorded_shape_is_refused_or_takes_a_preset(capsys):
    """A typo'd student_checkpoint planned the schema's 2-layer default and said the 1.7B job
    fits a 40 GB card."""
    over = ["model.student_hf=null", "model.student_checkpoint=/nonexistent/ckpt"]
    err = _err(capsys, PAPER, *over, "--vocab-size", "151936")
    assert "model.student_checkpoint='/nonexistent/ckpt' records no model config" in err
    assert "--student-preset NAME" in err
    assert main(["--config", PAPER, *over, "--student-preset", "Qwen3-1.7B"]) == 0
    out = capsys.readouterr().out
    assert "student: 28 layers, hidden 2048" in out and "records no model" in out


@pytest.mark.parametrize(
    "over, word",
    [
        (["loss.form=exact"], "loss.form=exact needs parallel.teacher.pp=1"),
        (["loss.form=exact", "parallel.teacher.pp=1", "parallel.teacher.tp=4"],
         "parallel.teacher.tp == parallel.student.tp"),
        (["parallel.student.vpp=2"], "parallel.student.vpp must be null"),
    ],
)  # fmt: skip
def test_layouts_the_trainer_refuses_are_refused(capsys, over, word):
    """These planned (and 'fit') although eaopd-train refuses them at its first check."""
    err = _err(capsys, PAPER, *over)
    assert "eaopd-train refuses this layout" in err and word in err


def test_presets_that_clash_or_go_unused_are_refused(capsys):
    """A given shape key was overwritten by the preset without a word; an unknown or unused
    --*-preset was ignored or answered 'pass --teacher-preset NAME'."""
    err = _err(capsys, PAPER, "model.student.heads=5")
    assert "model.student.heads=5 (the preset: 16)" in err
    # the preset's own values, as YAML reads them (strings, which the schema coerces): fine
    assert main(["--config", PAPER, "model.student.norm_eps=1e-6", "model.student.rope_base=1e6",
                 "model.student.heads=16"]) == 0  # fmt: skip
    capsys.readouterr()
    err = _err(capsys, PAPER, "--teacher-preset", "qwen3-14b")
    assert "'qwen3-14b' is not a preset" in err and "qwen3-8b" in err
    err = _err(capsys, TINY, "--vocab-size", "128", "--student-preset", "qwen3-8b")
    assert "drop the flag" in err


def test_the_teacher_folder_downloaded_before_the_students(capsys, tmp_path):
    """The planner's teacher placeholder met the teacher's own folder: 'set either
    model.teacher_hf or model.teacher_checkpoint', a key the user never set."""
    teacher = write_config(str(tmp_path), "Qwen3-8B")
    over = [f"model.teacher_hf={teacher}", f"model.student_hf={tmp_path}/absent/Qwen3-1.7B-Base"]
    assert main(["--config", PAPER, *over]) == 0
    out = capsys.readouterr().out
    assert "preset qwen3-1.7b" in out and "teacher: 36 layers" in out


def test_a_run_length_from_the_real_task_is_not_checked_against_the_builtin_one(capsys):
    """Folders not on disk put the built-in task in the MATH file's place: a warmup of 100
    was refused as longer than its 96 steps (the real run has 696)."""
    assert main(["--config", PAPER, "optimizer.warmup_iterations=100"]) == 0
    assert "peak, no recompute" in capsys.readouterr().out


def test_a_world_size_the_layout_does_not_divide_names_the_numbers(capsys):
    err = _err(capsys, PAPER, "--world-size", "6")
    assert "parallel.student.tp * pp = 2 * 2 = 4: give a multiple of 4" in err
