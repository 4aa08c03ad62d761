"""The metrics logger's outputs: JSONL records and TensorBoard event files read back."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest

from megatron_eaopd.trainer.metrics_log import MetricsLogger


def _cfg(**kw):
    base = dict(console=False, jsonl=True, tensorboard=True, wandb=False, wandb_project="p",
                wandb_entity=None, wandb_run_name=None)  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def test_jsonl_and_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(str(tmp_path), _cfg())
    rows = [(1, {"loss": 0.5, "gate": 0.25}), (2, {"loss": 0.25, "gate": 0.5, "note": "x"})]
    for it, metrics in rows:
        log.log("train", it, metrics)
    log.close()
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records == [{"split": "train", "iteration": it, **m} for it, m in rows]
    acc = EventAccumulator(os.path.join(tmp_path, "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/gate"}  # strings are not scalars
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 0.5), (2, 0.25)]


def test_resume_truncates_jsonl_to_the_checkpoint_iteration(tmp_path):
    log = MetricsLogger(str(tmp_path), _cfg(tensorboard=False))
    for it in (1, 2, 3):
        log.log("train", it, {"loss": float(it)})
    log.close()
    MetricsLogger(str(tmp_path), _cfg(tensorboard=False), resume_iteration=2).close()
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2]


def test_a_mean_of_no_tokens_is_null_in_jsonl_na_on_console_and_absent_from_tensorboard(
    tmp_path, capsys
):
    """An evaluation in which no teacher token is above the entropy threshold has no fkl_high:
    NaN from entropy_metrics (not a zero divergence), written as null / n/a / left out."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_eaopd.trainer.evaluate import entropy_metrics

    sums = dict(n=40.0, n_gated=0.0, fkl_gated=0.0, fkl=6.0, student_high_entropy=3.0,
                teacher_high_entropy=0.0, student_entropy=8.0, teacher_entropy=2.0)  # fmt: skip
    none = entropy_metrics(sums)
    assert math.isnan(none["fkl_high"]) and none["teacher_high_frac"] == 0
    assert none["fkl_all"] == pytest.approx(6.0 / 40) and none["student_high_frac"] == 3.0 / 40
    some = entropy_metrics({**sums, "n_gated": 4.0, "fkl_gated": 2.0})
    assert some["fkl_high"] == pytest.approx(0.5)

    log = MetricsLogger(str(tmp_path), _cfg(console=True))
    log.log("eval", 3, none)
    log.log("eval", 4, some)
    log.log("train", 5, {"loss": float("nan")})  # a NaN loss stays visible
    log.close()
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records[0]["fkl_high"] is None and records[1]["fkl_high"] == pytest.approx(0.5)
    assert records[0]["fkl_all"] == pytest.approx(0.15)
    out = capsys.readouterr().out
    assert "fkl_high=n/a" in out and "fkl_high=0.5" in out and "loss=nan" in out
    acc = EventAccumulator(os.path.join(tmp_path, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/fkl_high")] == [4]
    assert [e.step for e in acc.Scalars("eval/fkl_all")] == [3, 4]
    assert math.isnan(acc.Scalars("train/loss")[0].value)


def test_a_resume_drops_the_tensorboard_steps_after_the_checkpoint(tmp_path):
    """A run that died after its last checkpoint (node failure, TIMEOUT) logged steps the resume
    logs again: the JSONL is cut back, and TensorBoard must not show those steps twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(str(tmp_path), _cfg())
    for it in (1, 2, 3, 4):
        log.log("train", it, {"loss": float(it)})
    log.close()
    log = MetricsLogger(str(tmp_path), _cfg(), resume_iteration=2)  # the checkpoint: iteration 2
    for it in (3, 4):
        log.log("train", it, {"loss": 100.0 + it})
    log.close()
    acc = EventAccumulator(os.path.join(tmp_path, "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)], got


def test_every_attempt_of_a_run_logs_to_one_wandb_run(tmp_path, monkeypatch):
    """wandb.init(resume="allow") without an id started a new W&B run at every requeue."""
    import sys
    from types import ModuleType

    calls = []
    fake = ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or SimpleNamespace(log=lambda *a, **k: None,
                                                                finish=lambda: None)  # fmt: skip
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for resume in (None, 3):
        MetricsLogger(str(tmp_path / "run"), _cfg(tensorboard=False, wandb=True),
                      resume_iteration=resume).close()  # fmt: skip
    MetricsLogger(str(tmp_path / "other"), _cfg(tensorboard=False, wandb=True)).close()
    ids = [kw["id"] for kw in calls]
    assert ids[0] and ids[0] == ids[1] != ids[2]
    assert all(kw["resume"] == "allow" for kw in calls)


def test_a_wandb_that_cannot_log_leaves_the_run_going(tmp_path, monkeypatch, caplog):
    """logging.wandb on a compute node without login or network: wandb.init raised after both
    models had loaded and the run failed (exit 1, not requeued). Now a warning, and the metrics
    still reach metrics.jsonl; a wandb.log that fails later turns W&B off the same way. The
    missing credentials are named at the start, before the models load."""
    import sys
    from types import ModuleType

    from megatron_eaopd.trainer.metrics_log import wandb_warning

    fake = ModuleType("wandb")

    def no_login(**kw):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    fake.init = no_login
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with caplog.at_level("WARNING"):
        log = MetricsLogger(str(tmp_path / "run"), _cfg(tensorboard=False, wandb=True))
        log.log("train", 1, {"loss": 1.0})
    assert "W&B is off for this run: wandb.init failed (RuntimeError: No API key" in caplog.text
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 1.0

    def broken(*a, **k):
        raise ConnectionError("connection reset")

    fake.init = lambda **kw: SimpleNamespace(log=broken, finish=lambda: None)
    with caplog.at_level("WARNING"):
        log = MetricsLogger(str(tmp_path / "run2"), _cfg(tensorboard=False, wandb=True))
        log.log("train", 1, {"loss": 1.0})
        log.log("train", 2, {"loss": 2.0})
    assert "W&B is off from iteration 1: wandb.log failed (ConnectionError" in caplog.text
    assert len((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()) == 2

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = SimpleNamespace(logging=_cfg(wandb=True))
    assert "no W&B credentials were found" in wandb_warning(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_warning(cfg) is None
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_warning(cfg) is None
    # a self-hosted server: `wandb login --host` keeps the key under that host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.corp.example")
    assert "no W&B credentials" in wandb_warning(cfg)
    (tmp_path / "netrc").write_text("machine wandb.corp.example login user password abc\n")
    assert wandb_warning(cfg) is None
    assert wandb_warning(SimpleNamespace(logging=_cfg(wandb=False))) is None


def test_a_console_line_is_one_write(tmp_path, monkeypatch):
    """print() writes a line and its newline separately; under PYTHONUNBUFFERED (the launchers
    set it) torchrun's line prefix landed between them in a job log (seen in CI: a train line
    ending in '0.39580: ')."""
    import sys

    writes = []
    fake = SimpleNamespace(write=writes.append, flush=lambda: None)
    monkeypatch.setattr(sys, "stdout", fake)
    log = MetricsLogger(str(tmp_path), _cfg(console=True, jsonl=False, tensorboard=False))
    log.log("train", 1, {"loss": 0.5, "grad_norm": 2.0})
    assert writes == ["[train 1] loss=0.5, grad_norm=2\n"], writes


def test_a_full_disk_turns_metrics_files_off_not_the_run(tmp_path, monkeypatch, caplog):
    """A full disk under output_dir (checkpoints elsewhere) killed the run in TensorBoard's
    writer, losing every iteration since the last save. Now TensorBoard and metrics.jsonl are
    turned off with a warning; the JSONL never ends in half a record (a write that stopped
    short is cut back off), so its readers still load it."""
    import megatron_eaopd.trainer.metrics_log as ml
    from megatron_eaopd.trainer.metrics_log import read_metrics

    real_write, calls = os.write, []

    def filling(fd, data):  # the second record finds the disk full part-way through
        calls.append(len(data))
        return real_write(fd, data if len(calls) == 1 else data[: len(data) // 2])

    monkeypatch.setattr(ml.os, "write", filling)

    class BrokenBoard:
        closed = False

        def add_scalar(self, *a):
            raise OSError(28, "No space left on device")

        def close(self):
            BrokenBoard.closed = True
            raise OSError(28, "No space left on device")

    log = MetricsLogger(str(tmp_path), _cfg(tensorboard=False))
    log.tb = BrokenBoard()
    with caplog.at_level("WARNING"):
        for it in (1, 2, 3):
            log.log("train", it, {"loss": float(it)})
        log.close()
    assert "TensorBoard is off from train 1: its event writer failed (OSError" in caplog.text
    assert "metrics.jsonl is off from this record (train 2)" in caplog.text
    assert BrokenBoard.closed and log.tb is None and len(calls) == 2  # no retry after the failure
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_tensorboards_dying_writer_thread_prints_one_line(caplog, capsys):
    """Its event writer thread died of the full disk with a 40-line traceback on stderr; other
    threads' exceptions still reach the hook that was in place."""
    import threading

    import megatron_eaopd.trainer.metrics_log as ml

    previous = threading.excepthook
    seen = []
    threading.excepthook = lambda args: seen.append(args.exc_type)
    try:
        ml._quiet_writer_thread()
        ml._quiet_writer_thread()  # installed once

        def fail(exc):
            raise exc

        board = type("_AsyncWriterThread", (threading.Thread,), {})
        board.__module__ = "tensorboard.summary.writer.event_file_writer"
        with caplog.at_level("WARNING"):
            for cls, exc in ((board, OSError(28, "No space left on device")),
                             (threading.Thread, OSError(5, "io"))):  # fmt: skip
                t = cls(target=fail, args=(exc,))
                t.start()
                t.join()
    finally:
        threading.excepthook = previous
    assert "TensorBoard's event writer stopped: [Errno 28] No space left on device" in caplog.text
    assert seen == [OSError]  # the other thread's, passed on
    assert "Traceback" not in capsys.readouterr().err


def test_a_plot_that_cannot_be_written_leaves_no_partial_png(tmp_path, caplog, monkeypatch):
    from megatron_eaopd.eval import report

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"split": "eval", "iteration": 0, "mean/avg@8": 0.5}) + "\n")
    png = tmp_path / "eval_curves.png"

    def full(rows, path, k, title):
        open(path, "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_run", full)
    with caplog.at_level("WARNING"):
        assert report.plot_run_file(str(metrics), str(png)) is None
    assert "No space left on device" in caplog.text and not png.exists()
