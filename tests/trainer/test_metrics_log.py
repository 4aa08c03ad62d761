"""The metrics logger's outputs: JSONL records and TensorBoard event files read back."""

from __future__ import annotations

import json
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
