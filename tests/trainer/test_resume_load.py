"""A latest save whose shard is cut short or gone: the resume used to fail after both models were
built with a bare EOFError or FileNotFoundError on every rank. The file sizes its .metadata
records now find it before any model is built (``trainer.run_dir.latest_checkpoint_problem``),
and a load that fails anyway names the save and the earlier one to fall back on
(``load_for_resume``; ``eaopd-train`` exits 2). The earlier save then loads. 2 gloo ranks at
TP 2."""

from __future__ import annotations

import os
import re

from tests.dist import run_distributed
from tests.models import helpers


def _worker(rank, world, root):
    import torch.distributed as dist

    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.checkpoint import save_checkpoint
    from megatron_eaopd.models.student import OptimConfig, setup_student, train_step
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_parallel
    from megatron_eaopd.trainer.run_dir import (
        RunRefused,
        latest_checkpoint_problem,
        load_for_resume,
    )

    initialize_parallel(2, 1, seed=1)
    chunks = build_model(helpers.preset("tiny-student"))  # fresh weights, then two saves
    init_weights_layout_invariant(chunks, 1)
    student = setup_student(chunks, OptimConfig(lr=1e-3, total_steps=10))
    cfg = helpers.preset("tiny-student")
    for it in (2, 4):  # a step first: the saves hold optimizer state, as a run's do
        batches = helpers.make_batches(2, 2, 10, cfg.vocab_size, seed=it)
        iterators = helpers.chunk_iterators(batches, len(student.chunks))
        train_step(student, helpers.ce_forward_step(cfg.vocab_size), iterators, 2, 10, 2)
        save_checkpoint(root, it, student.chunks, student.optimizer, student.scheduler)
    dist.barrier()
    messages, early = [], [latest_checkpoint_problem(root, "iter_0000004")]
    for damage in ("delete", "truncate"):
        if rank == 0:
            shards = sorted(
                os.path.join(root, "iter_0000004", n)
                for n in os.listdir(os.path.join(root, "iter_0000004"))
                if n.endswith(".distcp")
            )
            if damage == "truncate":
                with open(shards[0], "r+b") as f:
                    f.truncate(16)
            else:
                os.remove(shards[-1])
        dist.barrier()
        early.append(latest_checkpoint_problem(root, "iter_0000004"))  # before any model
        try:
            load_for_resume(root, student)
            messages.append("")
        except RunRefused as err:
            messages.append(str(err))
        dist.barrier()
    destroy_parallel()
    return messages, early


def _fallback(rank, world, root):
    """The fix the message gives, in a new launch (as the user reruns): the earlier save loads."""
    from megatron_eaopd.models.builder import build_model
    from megatron_eaopd.models.student import OptimConfig, setup_student
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_parallel
    from megatron_eaopd.trainer.run_dir import load_for_resume

    initialize_parallel(2, 1, seed=1)
    student = setup_student(build_model(helpers.preset("tiny-student")), OptimConfig(lr=1e-3))
    iteration = load_for_resume(root, student).iteration
    destroy_parallel()
    return iteration


def test_a_broken_latest_save_names_the_earlier_one(tmp_path):
    root = str(tmp_path / "ckpt")
    messages, early = run_distributed(_worker, 2, root, timeout=300)[0]
    # the file sizes .metadata records find both before any model is built
    assert early[0] is None
    assert re.search(r"its shard __\d_\d\.distcp is missing", early[1])
    assert re.search(r"its shard __0_0\.distcp is cut short \(16 of \d+ bytes\)", early[2])
    latest = os.path.join(root, "latest")
    with open(latest, "w") as f:
        f.write("iter_0000002\n")
    assert run_distributed(_fallback, 2, root, timeout=300) == [2, 2]
    assert len(messages) == 2  # deleted, then cut short
    for text in messages:
        assert text.startswith(f"the latest checkpoint {root}/iter_0000004 cannot be resumed")
        assert f"echo iter_0000002 > {latest}" in text
        assert "\n" not in text and "Traceback" not in text  # one line, the reader's own error
    assert "FileNotFoundError" in messages[0] and "EOFError" in messages[1], messages


def test_a_resume_onto_a_disk_without_room_for_a_save_is_refused(tmp_path, monkeypatch):
    """The last attempt stopped because the checkpoint disk was full: relaunching trained again
    until the next save and failed there. The settings check now compares the free space with
    the latest save's size first; a finished run (nothing left to save) is not refused."""
    from megatron_eaopd.config import load_config
    from megatron_eaopd.models import save_errors
    from megatron_eaopd.models.checkpoint import META
    from megatron_eaopd.trainer.checks import _no_room_problem

    ckpt = tmp_path / "ck"
    (ckpt / "iter_0000004").mkdir(parents=True)
    (ckpt / "iter_0000004" / META).write_text('{"iteration": 4}')
    (ckpt / "iter_0000004" / "__0_0.distcp").write_bytes(b"\0" * 10_000)
    cfg = load_config(None, ["training.iterations=8"])
    monkeypatch.setattr(save_errors, "free_bytes", lambda path: 6_000)
    text = _no_room_problem(cfg, str(ckpt), "iter_0000004")
    assert text.startswith(f"cannot save the next checkpoint: {ckpt} has 6000 bytes free and a "
                           "save needs 1.0 MiB (iter_0000004's size + 1 MiB)")  # fmt: skip
    assert "iter_0000004 (latest) is intact" in text
    assert _no_room_problem(load_config(None, ["training.iterations=4"]), str(ckpt),
                            "iter_0000004") is None  # fmt: skip
    # a length derived from epochs (iterations: null, the paper configs): the save's record
    by_epochs = load_config(None, ["training.iterations=null", "training.epochs=1"])
    assert by_epochs.training.iterations is None
    assert _no_room_problem(by_epochs, str(ckpt), "iter_0000004") is not None
    sampler = '{"iteration": 4, "extra": {"sampler": {"num_prompts": 130}}}'
    (ckpt / "iter_0000004" / META).write_text(sampler)  # 128 prompts per iteration: 1 per epoch
    eight = load_config(None, ["training.iterations=null", "training.epochs=8"])
    assert _no_room_problem(eight, str(ckpt), "iter_0000004") is not None  # 8 to go to
    four = load_config(None, ["training.iterations=null", "training.epochs=4"])
    assert _no_room_problem(four, str(ckpt), "iter_0000004") is None  # 4 epochs end at 4
    (ckpt / "iter_0000004" / META).write_text('{"iteration": 4}')
    monkeypatch.setattr(save_errors, "free_bytes", lambda path: 10_016 + (1 << 20))
    assert _no_room_problem(cfg, str(ckpt), "iter_0000004") is None
    # an interrupted save's leftover is removed before the next save writes: room it will have
    monkeypatch.setattr(save_errors, "free_bytes", lambda path: 1 << 20)
    assert _no_room_problem(cfg, str(ckpt), "iter_0000004") is not None
    (ckpt / ".tmp-iter_0000006").mkdir()
    (ckpt / ".tmp-iter_0000006" / "__0_0.distcp").write_bytes(b"\0" * 10_016)
    assert _no_room_problem(cfg, str(ckpt), "iter_0000004") is None
