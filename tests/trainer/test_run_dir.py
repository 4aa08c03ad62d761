"""The run folder (``trainer.run_dir``): one live launch per folder (a lock the kernel drops when
its process dies), and the records of an earlier attempt moved aside, never mixed into the new
run's or deleted: a fresh start after an attempt that saved no checkpoint, a resume after an
attempt that wrote past its checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_eaopd.trainer.run_dir import (
    LOCK_NAME,
    RunFolderBusy,
    lock_output_dir,
    set_aside_after,
    set_aside_earlier_attempt,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny-cpu-tp2.yaml"


def _locked_by_someone(path: Path) -> bool:
    """Whether another open file holds a flock on ``path`` (checked with fcntl directly)."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run``'s lock through lock_output_dir (killed at the
    end if still alive); yields (folder, process)."""
    out = tmp_path / "run"
    code = (
        "import sys; from megatron_eaopd.trainer.run_dir import lock_output_dir; "
        f"lock_output_dir({str(out)!r}); print('locked', flush=True); sys.stdin.read()"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_live_run_holds_its_folder_and_a_killed_one_does_not(holder):
    out, proc = holder
    assert _locked_by_someone(out / LOCK_NAME)
    with pytest.raises(RunFolderBusy) as err:
        lock_output_dir(str(out))
    text = str(err.value)
    assert f"training.output_dir={out} is in use" in text
    assert f"host {socket.gethostname()} pid {proc.pid}" in text
    assert "new training.output_dir" in text
    proc.send_signal(signal.SIGKILL)  # no cleanup: the kernel drops the lock
    proc.wait()
    assert (out / LOCK_NAME).exists()  # the stale file stays, and does not matter
    lock = lock_output_dir(str(out))
    assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()
    again = lock_output_dir(str(out) + "/.")  # re-entrant in one process (CLI, then Trainer)
    lock.release()
    assert _locked_by_someone(out / LOCK_NAME)  # still held by the second hold
    again.release()
    again.release()  # a second release of one hold changes nothing
    assert not _locked_by_someone(out / LOCK_NAME)


def test_the_cli_refuses_a_second_launch_with_exit_2(holder, tmp_path, capsys, monkeypatch):
    import megatron_eaopd.data as data
    from megatron_eaopd.cli import main

    out, proc = holder

    def prepare_data(cfg):
        raise AssertionError("the second launch got as far as preparing the data")

    monkeypatch.setattr(data, "prepare_data", prepare_data)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    before = sorted(p.name for p in out.iterdir())
    assert main(["--config", str(CONFIG), f"training.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"training.output_dir={out} is in use by another live run" in err
    assert f"pid {proc.pid}" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or truncated
    # another rank of the launch (not the folder's writer) does not take the lock
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(AssertionError, match="preparing the data"):
        main(["--config", str(CONFIG), f"training.output_dir={out}"])


def test_a_checkpoint_folder_outside_the_run_folder_is_locked_too(holder, tmp_path):
    """Two launches with their own output_dir and one training.checkpoint_dir both ran, and the
    later overwrote the other's saves (the check of whose saves a folder holds needs a `latest`
    to exist already). The checkpoint folder is now locked with the run folder."""
    from megatron_eaopd.config import load_config
    from megatron_eaopd.trainer.run_dir import lock_run_folders

    shared, proc = holder  # another run holds the folder through lock_output_dir
    cfg = load_config(CONFIG, [f"training.output_dir={tmp_path / 'mine'}",
                               f"training.checkpoint_dir={shared}"])  # fmt: skip
    with pytest.raises(RunFolderBusy) as err:
        lock_run_folders(cfg)
    text = str(err.value)
    assert f"training.checkpoint_dir={shared} is in use by another live run" in text
    assert "give this one a new training.checkpoint_dir" in text
    assert not _locked_by_someone(tmp_path / "mine" / LOCK_NAME)  # its own lock let go
    proc.kill()
    proc.wait()
    held = lock_run_folders(cfg)
    assert len(held) == 2 and _locked_by_someone(shared / LOCK_NAME)
    for lock in held:
        lock.release()
    mine = tmp_path / "mine"
    inside = load_config(
        CONFIG, [f"training.output_dir={mine}", f"training.checkpoint_dir={mine / 'ck'}"]
    )
    held = lock_run_folders(inside)  # a checkpoint folder in the run folder: one lock
    assert len(held) == 1
    held[0].release()


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_fresh_start_moves_an_earlier_attempts_records_aside(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert set_aside_earlier_attempt(str(out)) is None  # nothing to move
    assert not (out / "earlier_attempts").exists()
    rows = [{"split": "teacher", "iteration": 0}, {"split": "train", "iteration": 1}]
    _write_jsonl(out / "metrics.jsonl", rows)
    (out / "config.yaml").write_text("training: {seed: 1}\n")
    (out / "eval_samples").mkdir()
    (out / "eval_samples" / "student_iter_0000000.jsonl").write_text("{}\n")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out").write_text("x")
    folder = Path(set_aside_earlier_attempt(str(out)))
    assert folder.parent == out / "earlier_attempts" and folder.name.endswith("-no-checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "earlier_attempts"]
    assert [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()] == rows
    assert (folder / "eval_samples" / "student_iter_0000000.jsonl").read_text() == "{}\n"
    assert (folder / "tensorboard" / "events.out").read_text() == "x"
    assert (folder / "config.yaml").read_text() == "training: {seed: 1}\n"
    # a second dead attempt in the same second: a folder of its own
    _write_jsonl(out / "metrics.jsonl", rows[:1])
    second = Path(set_aside_earlier_attempt(str(out)))
    assert second != folder and (folder / "metrics.jsonl").exists()
    assert len(list((out / "earlier_attempts").iterdir())) == 2


def test_a_resume_moves_what_was_written_after_the_checkpoint_aside(tmp_path):
    out = tmp_path / "run"
    (out / "eval_samples").mkdir(parents=True)
    rows = [{"split": "teacher", "iteration": 0}, {"split": "eval", "iteration": 0}]
    rows += [{"split": "train", "iteration": i} for i in range(1, 7)]
    rows += [{"split": "eval", "iteration": i} for i in (2, 4, 6)]
    _write_jsonl(out / "metrics.jsonl", rows)
    names = ["teacher_iter_0000000.jsonl", "student_iter_0000000.jsonl",
             "student_iter_0000004.jsonl", "student_iter_0000005.jsonl",
             "student_iter_0000010.jsonl", "notes.txt"]  # fmt: skip
    for name in names:
        (out / "eval_samples" / name).write_text(name)
    assert set_aside_after(str(out), 10) is None  # nothing past iteration 10
    folder = Path(set_aside_after(str(out), 4))
    assert folder.parent == out / "earlier_attempts"
    assert folder.name.endswith("-after-iter_0000004")
    kept = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    moved = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert kept == [r for r in rows if r["iteration"] <= 4]
    assert moved == [r for r in rows if r["iteration"] > 4]
    assert sorted(p.name for p in (out / "eval_samples").iterdir()) == sorted(
        n for n in names if n not in ("student_iter_0000005.jsonl", "student_iter_0000010.jsonl")
    )
    for name in ("student_iter_0000005.jsonl", "student_iter_0000010.jsonl"):
        assert (folder / "eval_samples" / name).read_text() == name
    assert set_aside_after(str(out), 4) is None  # done once


def test_a_line_a_kill_cut_short_goes_aside_and_the_resume_reads_on(tmp_path):
    """A SIGKILL mid-write leaves a partial last line in metrics.jsonl: it goes aside with the
    interrupted attempt's records, and the resumed run's logger (which rewrites the file up to
    the checkpoint) and the report read the rest (the partial line crashed every resume)."""
    from types import SimpleNamespace

    from megatron_eaopd.trainer.metrics_log import MetricsLogger, read_metrics

    out = tmp_path / "run"
    out.mkdir()
    rows = [{"split": "train", "iteration": i} for i in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"split": "tr'
    (out / "metrics.jsonl").write_text(text)
    assert read_metrics(out / "metrics.jsonl") == rows  # skipped, with a warning
    folder = Path(set_aside_after(str(out), 2))
    assert (folder / "metrics.jsonl").read_text() == json.dumps(rows[2]) + '\n{"split": "tr\n'
    cfg = SimpleNamespace(jsonl=True, tensorboard=False, wandb=False, console=False)
    MetricsLogger(str(out), cfg, resume_iteration=2)
    assert read_metrics(out / "metrics.jsonl") == rows[:2]


def test_a_full_disk_at_the_lock_is_a_named_refusal(tmp_path, monkeypatch):
    """Writing the holder line into run.lock on a full disk was a raw OSError traceback (and,
    buffered, a second one from close()'s flush)."""
    from megatron_eaopd.trainer import run_dir

    out = tmp_path / "run"
    out.mkdir()
    real_write = os.write

    def full(fd, data):  # only the lock file's descriptor finds the disk full
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(out / LOCK_NAME):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(run_dir.os, "write", full)
    with pytest.raises(
        ValueError,
        match=r"training.output_dir=.*run: cannot write .*run.lock "
        r"\(No space left on device\); free space on that disk",
    ):
        lock_output_dir(str(out))
    monkeypatch.undo()
    assert not _locked_by_someone(out / LOCK_NAME)  # closed: the lock went with it
    lock_output_dir(str(out)).release()


def test_a_mark_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    """A full checkpoint disk after the end-of-run evaluation: marking the save evaluated raised
    a raw OSError and the run ended with exit 1 and no table."""
    from megatron_eaopd.trainer.run_dir import evaluated_marker, mark_evaluated

    (tmp_path / "iter_0000003").mkdir()
    mark_evaluated(str(tmp_path), 3)
    assert evaluated_marker(str(tmp_path), 3) and not evaluated_marker(str(tmp_path), 4)
    (tmp_path / "iter_0000005" / "evaluated").mkdir(parents=True)  # open() fails: IsADirectory
    with caplog.at_level("WARNING"):
        mark_evaluated(str(tmp_path), 5)
    assert "cannot mark" in caplog.text and "a relaunch evaluates it again" in caplog.text
