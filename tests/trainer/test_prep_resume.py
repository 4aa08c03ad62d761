"""A teacher preparation stopped by a preemption signal saves its progress and the next run
continues it: the prepared weights equal those of an uninterrupted preparation bit for bit (the
same example draws, the optimizer and schedule restored). Before, a signal during a preparation
was acted on only after it and the first iteration, and a preparation longer than an allocation
never finished (2 gloo ranks, DP 2)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer.common import StopAfter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu.yaml")


def _weights(mcfg, root):
    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.checkpoint import load_checkpoint

    chunks = build_model(mcfg)
    load_checkpoint(root, chunks, load_rng=False)
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items() if v is not None
            and isinstance(v, torch.Tensor)}  # fmt: skip


def _worker(rank, world, tmp):
    from megatron_eaopd.config import load_config
    from megatron_eaopd.data import prepare_data
    from megatron_eaopd.parallel.init import destroy_parallel, use_layout
    from megatron_eaopd.trainer import Trainer
    from megatron_eaopd.trainer.build import TEACHER, init_layouts, model_configs
    from megatron_eaopd.trainer.teacher_prep import PreparationStopped, prepare_supervised

    overrides = [
        f"tokenizer.cache_dir={tmp}/tok", "teacher_prep.iterations=6",
        "teacher_prep.batch_size=8", "student_prep.enabled=false", "training.iterations=2",
        "task.synthetic.num_train=100", f"training.output_dir={tmp}/run",
        "logging.progress_bars=false", "logging.console=false",
    ]  # fmt: skip
    cfg = load_config(CONFIG, overrides)
    data = prepare_data(cfg)
    init_layouts(cfg)
    out = {}
    try:
        _, teacher_cfg = model_configs(cfg, data.vocab_size)
        whole = dataclasses.replace(cfg.teacher_prep, cache_dir=f"{tmp}/whole")
        split = dataclasses.replace(cfg.teacher_prep, cache_dir=f"{tmp}/split")
        a = prepare_supervised(data, teacher_cfg, whole, TEACHER, "teacher", False)
        out["stopped"] = []
        for _ in range(2):  # two stops (at steps 2 and 4): one saved copy is kept
            try:
                prepare_supervised(data, teacher_cfg, split, TEACHER, "teacher", False,
                                   StopAfter(2).should_stop)  # fmt: skip
            except PreparationStopped as err:
                out["stopped"].append(str(err))
        (partial,) = _entries(f"{tmp}/split")
        out["partial"] = [partial, sorted(os.listdir(f"{tmp}/split/{partial}"))]
        b = prepare_supervised(data, teacher_cfg, split, TEACHER, "teacher", False)
        out["after"] = _entries(f"{tmp}/split")
        with use_layout(TEACHER):
            wa, wb = _weights(teacher_cfg, a), _weights(teacher_cfg, b)
        out["same"] = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        out["logs"] = [open(os.path.join(r, "teacher_prep.jsonl")).read() for r in (a, b)]
        # used again after its checksums are verified; 64 changed bytes are refused by name
        out["cached"] = prepare_supervised(data, teacher_cfg, whole, TEACHER, "teacher", False)
        out["whole"] = a
        if rank == 0:
            with open(os.path.join(a, "latest"), encoding="utf-8") as f:
                folder = os.path.join(a, f.read().strip())
            files = [os.path.join(folder, n) for n in os.listdir(folder)]
            big = max((x for x in files if os.path.isfile(x)), key=os.path.getsize)
            with open(big, "r+b") as f:
                f.seek(100)
                flipped = bytes(255 - x for x in f.read(64))
                f.seek(100)
                f.write(flipped)
        try:
            prepare_supervised(data, teacher_cfg, whole, TEACHER, "teacher", False)
            out["damaged"] = None
        except ValueError as err:
            out["damaged"] = str(err)
    finally:
        destroy_parallel()
    # the trainer: a stop during its teacher preparation ends the run as stopped (iteration 0)
    cfg = load_config(CONFIG, [*overrides, f"teacher_prep.cache_dir={tmp}/trainer"])
    trainer = Trainer(cfg, StopAfter(2))
    try:
        trainer.setup()
        out["summary"] = trainer.run()
    finally:
        trainer.close()
        destroy_parallel()
    out["trainer_cache"] = _entries(f"{tmp}/trainer")
    return out


def _entries(folder: str) -> list[str]:
    """A cache folder's entries, without the preparations' lock files (kept: an empty file)."""
    return sorted(n for n in os.listdir(folder) if not n.endswith(".lock"))


def test_a_stopped_preparation_continues_to_the_uninterrupted_result(tmp_path):
    r = run_distributed(_worker, 2, str(tmp_path), timeout=600)[0]
    assert len(r["stopped"]) == 2, r["stopped"]
    assert "stopped at step 2 of 6" in r["stopped"][0] and "step 4 of 6" in r["stopped"][1]
    key = [n for n in r["after"]]  # the partial preparation is gone once it completed
    assert len(key) == 1 and r["partial"][0] == key[0] + ".partial", (r["partial"], r["after"])
    assert r["partial"][1] == ["iter_0000004", "latest"], r["partial"]  # the newest save only
    assert r["same"], "the continued preparation differs from the uninterrupted one"
    assert r["cached"] == r["whole"] and r["damaged"] is not None
    assert "is damaged" in r["damaged"] and "differs from the file that was saved" in r["damaged"]
    log_a, log_b = ([json.loads(x) for x in log.splitlines()] for log in r["logs"])
    assert [x["step"] for x in log_b] == list(range(1, 7))
    assert [x["loss"] for x in log_a] == [x["loss"] for x in log_b]
    s = r["summary"]
    assert s["stopped_early"] and s["iteration"] == 0 and s["total_iterations"] == 2
    assert len(r["trainer_cache"]) == 1 and r["trainer_cache"][0].endswith(".partial")


def test_a_second_job_waits_for_the_preparation_of_the_same_entry(tmp_path):
    """Two jobs with one cache entry (a sweep started at once) used to write the same folders
    and crash: the second now waits on the entry's lock until the first releases it (here: a
    thread holding it for a while) and the kernel frees the lock of a process that died."""
    import fcntl
    import threading
    import time

    from megatron_eaopd.trainer.teacher_prep import PreparationStopped, _entry_lock

    root = str(tmp_path / "teachers" / "key")
    os.makedirs(os.path.dirname(root))
    held = open(root + ".lock", "a+")  # noqa: SIM115 - the other job's lock
    fcntl.flock(held, fcntl.LOCK_EX)

    def release():
        time.sleep(0.5)
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()

    thread = threading.Thread(target=release)
    start = time.monotonic()
    thread.start()
    with _entry_lock(root, "teacher", poll=0.05):
        waited = time.monotonic() - start
    thread.join()
    assert waited >= 0.4, waited
    with _entry_lock(root, "teacher", poll=0.05):  # free again: no wait
        pass
    # a preemption signal while waiting: the run stops (and is requeued) instead of waiting on
    held = open(root + ".lock", "a+")  # noqa: SIM115
    fcntl.flock(held, fcntl.LOCK_EX)
    asked = []
    with pytest.raises(PreparationStopped, match="while another job prepares the teacher"):
        with _entry_lock(root, "teacher", poll=0.05, should_stop=lambda: asked.append(1) or True):
            pass
    assert asked == [1]
    held.close()
