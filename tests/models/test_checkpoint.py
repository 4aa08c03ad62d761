"""Save at one layout, load at another, continue; atomic commits; teacher load and scoring.

One 2-process launch: the student trains a step at (tp, pp) = (2, 1) and is saved; the run goes on
for two more steps (the reference). Then the same processes switch to (1, 2), build a student with
other weights, load the checkpoint and take the same two steps: losses and weights must match the
reference. The checkpoint also feeds a frozen teacher at both layouts, whose logits and payload
must agree. A save that fails before its commit must leave `latest` on the previous checkpoint.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers

CFG = "tiny-student"
NUM_MICROBATCHES, MICRO_BATCH, SEQ = 2, 2, 10


def _student(cfg, seed, tp, pp):
    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig, setup_student
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, pp, seed=seed)
    chunks = build_model(cfg)
    init_weights_layout_invariant(chunks, seed)
    optim = OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=1, total_steps=10, clip_grad=1.0)
    return setup_student(chunks, optim)


def _poisoned(forward_step, poison):
    """Make the loss NaN, or keep it finite with NaN gradients (sqrt'(0) * 0)."""

    def step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def poisoned_loss(logits):
            loss, metrics = loss_func(logits)
            if poison == "nan_loss":
                return loss * float("nan"), {"loss": metrics["loss"] * float("nan")}
            return loss + torch.sqrt((logits * 0).sum()), metrics

        return output, poisoned_loss

    return step


def _step(student, cfg, batches, poison=None):
    from megatron_eaopd.models.student import train_step

    forward_step = helpers.ce_forward_step(cfg.vocab_size)
    return train_step(
        student,
        _poisoned(forward_step, poison) if poison else forward_step,
        helpers.chunk_iterators(batches, len(student.chunks)),
        NUM_MICROBATCHES,
        SEQ,
        MICRO_BATCH,
    )


def _teacher_scores(cfg, root, batches):
    from megatron_eaopd.models.builder import build_model
    from megatron_eaopd.models.checkpoint import load_teacher
    from megatron_eaopd.models.teacher import FrozenTeacher

    teacher = FrozenTeacher(build_model(cfg))
    assert teacher.trainable_parameters() == []
    assert all(not c.training for c in teacher.chunks)
    with pytest.raises(RuntimeError, match="frozen"):
        teacher.train()
    loaded = load_teacher(root, teacher)
    logits = teacher.score(batches, SEQ, MICRO_BATCH)
    payload = teacher.score(batches, SEQ, MICRO_BATCH, payload_k=4, vocab_size=cfg.vocab_size)
    assert all(not t.requires_grad for t in logits)
    return {
        "iteration": loaded.iteration,
        "logits": [t.clone() for t in logits],
        "payload": [tuple(x.clone() for x in p) for p in payload],
    }


def checkpoint_worker(rank, world_size, root):
    from megatron_eaopd.models import checkpoint, save_errors
    from megatron_eaopd.models.save_errors import CheckpointSaveError
    from megatron_eaopd.parallel.init import initialize_parallel

    cfg = helpers.preset(CFG)
    batches = [
        helpers.make_batches(NUM_MICROBATCHES, MICRO_BATCH, SEQ, cfg.vocab_size, seed=s)
        for s in range(3)
    ]
    out = {}
    # A bad layout fails at start, before any group is created.
    with pytest.raises(ValueError, match="not a multiple of tp x pp"):
        initialize_parallel(4, 1)

    # Phase A: (tp, pp) = (2, 1).
    student = _student(cfg, 3, 2, 1)
    out["a_step1"] = _step(student, cfg, batches[0])
    checkpoint.save_checkpoint(
        root, 1, student.chunks, student.optimizer, student.scheduler, extra={"data_position": 7}
    )
    out["a_weights_saved"] = helpers.global_pieces(student.chunks)
    out["a_teacher"] = _teacher_scores(cfg, root, batches[1])
    out["a_steps"] = [_step(student, cfg, batches[1]), _step(student, cfg, batches[2])]
    out["a_weights_end"] = helpers.global_pieces(student.chunks)

    # A save that fails before its commit (the disk filled up) leaves `latest` on iteration 1
    # and says so, on every rank it failed on.
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    checkpoint._before_commit = full
    with pytest.raises(CheckpointSaveError) as failed:
        checkpoint.save_checkpoint(root, 2, student.chunks, student.optimizer, student.scheduler)
    checkpoint._before_commit = None
    out["write_failed"] = (str(failed.value), failed.value.everywhere)
    # A disk without room for another save of this size: every rank stops before writing.
    room = save_errors.free_bytes
    save_errors.free_bytes = lambda path: 1000
    with pytest.raises(CheckpointSaveError) as refused:
        checkpoint.save_checkpoint(root, 2, student.chunks, student.optimizer, student.scheduler)
    save_errors.free_bytes = room
    out["no_room"] = (str(refused.value), refused.value.everywhere)
    assert checkpoint.resolve_checkpoint(root).endswith("iter_0000001")
    assert not os.path.exists(os.path.join(root, "iter_0000002"))

    # Phase B: (tp, pp) = (1, 2), other initial weights, then resume.
    student = _student(cfg, 99, 1, 2)
    loaded = checkpoint.load_checkpoint(root, student.chunks, student.optimizer, student.scheduler)
    out["b_loaded"] = (loaded.iteration, loaded.extra, loaded.rng_restored, loaded.saved_layout)
    out["b_weights_loaded"] = helpers.global_pieces(student.chunks)
    out["b_steps"] = [_step(student, cfg, batches[1]), _step(student, cfg, batches[2])]
    out["b_weights_end"] = helpers.global_pieces(student.chunks)
    out["b_teacher"] = _teacher_scores(cfg, root, batches[1])

    # Non-finite updates are skipped, counted, and leave weights and optimizer untouched.
    before = helpers.global_pieces(student.chunks)
    for poison in ("nan_loss", "nan_grad"):
        out_bad = _step(student, cfg, batches[0], poison)
        assert out_bad["skipped"], poison
    assert student.skipped_updates == 2
    after = helpers.global_pieces(student.chunks)
    assert all(torch.equal(a[1], b[1]) for k in before for a, b in zip(before[k], after[k])), (
        "a skipped update changed the weights"
    )
    out["c_step_after_skips"] = _step(student, cfg, batches[1])

    # Missing checkpoints: clear errors.
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.load_checkpoint(os.path.join(root, "nope"), student.chunks)
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        checkpoint.load_checkpoint(root, student.chunks, iteration=5)
    out["last_stage"] = rank == world_size - 1
    return out


def _concat_vocab(per_rank_logits):
    return [torch.cat(parts, dim=-1) for parts in zip(*per_rank_logits)]


def test_save_tp2_load_pp2_continue_and_teacher(tmp_path):
    root = str(tmp_path / "ckpt")
    res = run_distributed(checkpoint_worker, 2, root, timeout=240)
    # The failed save removed its temp directory; latest still names iteration 1.
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest"]
    for rank, r in enumerate(res):
        text, everywhere = r["write_failed"]
        assert text.startswith(f"saving iter_0000002 to {root} failed on rank {rank}: OSError: ")
        assert "No space left on device" in text and "iter_0000001 (latest) is intact" in text
        assert not everywhere
        text, everywhere = r["no_room"]  # rank 0's verdict, on every rank
        assert text.startswith(f"cannot save iter_0000002: {root} has 1000 bytes free and a save")
        assert "Nothing was written; iter_0000001 (latest) is intact" in text and everywhere
        assert (
            "Make room (free space on that disk) or move the checkpoint folder to another "
            "disk and set training.checkpoint_dir to its new place" in text
        )

    for r in res:
        assert r["b_loaded"][:3] == (1, {"data_position": 7}, False)
        assert r["b_loaded"][3] == {"tp": 2, "pp": 1, "vpp": None, "world_size": 2}
        for a, b in zip(r["a_steps"], r["b_steps"]):
            assert not a["skipped"] and not b["skipped"]
            assert a["lr"] == b["lr"]
            torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
        # Training goes on after two skipped updates.
        after_skips = r["c_step_after_skips"]
        assert not after_skips["skipped"] and torch.isfinite(torch.tensor(after_skips["loss"]))
        # Training moved: the continued losses differ from the first step's.
        assert r["a_steps"][1]["loss"] != r["a_step1"]["loss"]

    saved = helpers.assemble([r["a_weights_saved"] for r in res])
    loaded = helpers.assemble([r["b_weights_loaded"] for r in res])
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    end_a = helpers.assemble([r["a_weights_end"] for r in res])
    end_b = helpers.assemble([r["b_weights_end"] for r in res])
    for key in end_a:
        torch.testing.assert_close(end_a[key], end_b[key], rtol=1e-4, atol=1e-5, msg=key)
        assert not torch.equal(end_a[key], saved[key]), f"{key} did not train"

    # Teacher from the same checkpoint: (2, 1) logits are vocab shards, (1, 2) on the last stage.
    logits_a = _concat_vocab([r["a_teacher"]["logits"] for r in res])
    logits_b = [r for r in res if r["last_stage"]][0]["b_teacher"]["logits"]
    assert [r["b_teacher"]["logits"] for r in res if not r["last_stage"]] == [[]]
    assert len(logits_a) == len(logits_b) == NUM_MICROBATCHES
    for a, b in zip(logits_a, logits_b):
        assert a.shape == (SEQ, MICRO_BATCH, b.shape[-1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    payload_a = res[0]["a_teacher"]["payload"]
    payload_b = [r for r in res if r["last_stage"]][0]["b_teacher"]["payload"]
    vocab = helpers.preset(CFG).vocab_size
    for pa, pb, full in zip(payload_a, payload_b, logits_b):
        torch.testing.assert_close(pa[0], pb[0], rtol=1e-5, atol=1e-5)  # entropy
        torch.testing.assert_close(pa[1], pb[1], rtol=1e-5, atol=1e-5)  # sampled-token logprob
        torch.testing.assert_close(pa[2], pb[2], rtol=1e-5, atol=1e-5)  # top-k logprobs
        assert torch.equal(pa[3], pb[3])  # top-k ids
        # Independent reference: torch on the full logits over the real vocabulary.
        logp = torch.log_softmax(full[..., :vocab], dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(pa[0], entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pa[2], logp.topk(4, dim=-1).values, rtol=1e-5, atol=1e-5)


def vpp_worker(rank, world_size, root):
    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.checkpoint import load_checkpoint, load_teacher, save_checkpoint
    from megatron_eaopd.models.student import OptimConfig, setup_student
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import initialize_parallel

    cfg = helpers.preset("tiny-teacher")
    batches = helpers.make_batches(NUM_MICROBATCHES, MICRO_BATCH, SEQ, cfg.vocab_size, seed=4)
    out = {}
    initialize_parallel(1, 2, 2, seed=1)  # interleaved: 2 chunks of 1 layer per rank
    teacher = FrozenTeacher(build_model(cfg))
    init_weights_layout_invariant(teacher.chunks, 6)
    save_checkpoint(root, 0, teacher, save_rng=False)  # model only
    out["vpp_weights"] = helpers.global_pieces(teacher.chunks)
    out["vpp_logits"] = teacher.score(batches, SEQ, MICRO_BATCH)

    initialize_parallel(2, 1, seed=1)
    teacher = FrozenTeacher(build_model(cfg))
    load_teacher(root, teacher)
    out["tp_weights"] = helpers.global_pieces(teacher.chunks)
    out["tp_logits"] = teacher.score(batches, SEQ, MICRO_BATCH)
    student = setup_student(build_model(cfg), OptimConfig())
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(root, student.chunks, student.optimizer)
    return out


def test_model_only_checkpoint_from_interleaved_pipeline_to_tp(tmp_path):
    root = str(tmp_path / "teacher")
    res = run_distributed(vpp_worker, 2, root, timeout=240)
    saved = helpers.assemble([r["vpp_weights"] for r in res])
    loaded = helpers.assemble([r["tp_weights"] for r in res])
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    vpp_logits = res[1]["vpp_logits"]  # the last pipeline stage
    tp_logits = _concat_vocab([r["tp_logits"] for r in res])
    assert res[0]["vpp_logits"] == [] and len(vpp_logits) == NUM_MICROBATCHES
    for a, b in zip(vpp_logits, tp_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prune_keeps_the_newest_complete_saves_and_the_latest(tmp_path):
    """training.keep_checkpoints: the newest N complete iter_* folders up to the one ``latest``
    names stay; newer ones are an abandoned attempt's (a run resumed from an earlier save after
    the newest proved broken): neither counted nor deleted, so the good save it fell back to is
    not deleted to keep them. Leftovers of interrupted saves go; a folder without its metadata
    (incomplete) is not counted as a save and is not deleted."""
    from megatron_eaopd.models.checkpoint import LATEST, META, prune_checkpoints

    root = tmp_path / "ckpt"
    for it in (2, 4, 6, 8):
        (root / f"iter_{it:07d}").mkdir(parents=True)
        (root / f"iter_{it:07d}" / META).write_text("{}")
    (root / "iter_0000010").mkdir()  # no metadata: not a complete save
    (root / ".tmp-iter_0000012").mkdir()
    (root / ".old-iter_0000003").mkdir()
    (root / LATEST).write_text("iter_0000004\n")  # resumed from 2, saved 4 again
    gone = prune_checkpoints(str(root), 1)
    left = sorted(os.listdir(root))
    assert left == ["iter_0000004", "iter_0000006", "iter_0000008", "iter_0000010", LATEST]
    assert sorted(os.path.basename(p) for p in gone) == [
        ".old-iter_0000003",
        ".tmp-iter_0000012",
        "iter_0000002",
    ]
    (root / LATEST).write_text("iter_0000008\n")
    prune_checkpoints(str(root), 2)
    assert sorted(os.listdir(root)) == ["iter_0000006", "iter_0000008", "iter_0000010", LATEST]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(str(root), 0)


def _folder_worker(rank, world, tmp):
    import shutil

    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.checkpoint import load_checkpoint, save_checkpoint
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_parallel

    cfg = helpers.preset(CFG)
    initialize_parallel(1, 1, seed=1)
    chunks = build_model(cfg)
    weights = {}
    for it, seed in ((1, 3), (2, 4)):
        init_weights_layout_invariant(chunks, seed)
        weights[it] = [p.detach().clone() for p in chunks[0].parameters()]
        save_checkpoint(f"{tmp}/ckpt", it, chunks, save_rng=False)
    shutil.copytree(f"{tmp}/ckpt/iter_0000001", f"{tmp}/best")  # a copied folder, no root
    got = {}
    for name, where in (("root", f"{tmp}/ckpt"), ("folder", f"{tmp}/best"),
                        ("iter", f"{tmp}/ckpt/iter_0000001")):  # fmt: skip
        init_weights_layout_invariant(chunks, 9)
        load_checkpoint(where, chunks, load_rng=False)
        got[name] = [p.detach().clone() for p in chunks[0].parameters()]
    destroy_parallel()
    same = {k: all(torch.equal(a, b) for a, b in zip(v, weights[1 if k != "root" else 2]))
            for k, v in got.items()}  # fmt: skip
    return same


def test_load_one_checkpoint_folder_or_a_root():
    """A checkpoint folder given itself (an iter_* folder, or a copy of one with no root around
    it) loads that folder; a root loads the one `latest` names (eaopd-convert export-hf used to
    export the root's latest for a copied folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        same = run_distributed(_folder_worker, 1, tmp, timeout=300)[0]
    assert same == {"root": True, "folder": True, "iter": True}


def test_failure_text_finds_the_os_error_a_save_died_of():
    """torch's CheckpointException carries each rank's exception with a traceback; a write that
    failed for want of space shows up as a zip-writer RuntimeError caused by an OSError."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_eaopd.models.save_errors import failure_text

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from (
                inner
            )
    except RuntimeError as wrapped:
        zip_error = wrapped
    assert failure_text(zip_error) == (
        "RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos "
        "(No space left on device)"
    )
    dcp = CheckpointException("save failed", {1: (full, None), 0: (zip_error, None)})
    assert failure_text(dcp).startswith("RuntimeError: [enforce fail")  # the lowest rank's
    assert failure_text(ValueError("a\nb")) == "ValueError: a"


def test_a_failed_save_on_a_full_filesystem_is_named_full():
    """torch's zip writer and dist_checkpointing often lose the OSError of a full disk
    ('unexpected pos 704 vs 598', 'CheckpointException ranks:dict_keys([])'): the free space
    when the save failed names it."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_eaopd.models.save_errors import write_failed

    lost = CheckpointException("ranks:dict_keys([])", {})
    text = write_failed("/ck", "iter_0000006", 1, lost, "iter_0000004", 0)
    assert text.startswith("saving iter_0000006 to /ck failed on rank 1: CheckpointException")
    assert "; the disk is full: 0 bytes free there when it failed." in text
    assert "iter_0000004 (latest) is intact" in text
    roomy = write_failed("/ck", "iter_0000006", 0, RuntimeError("io"), None, 5 << 30)
    assert "disk is full" not in roomy
    assert "; 5.00 GiB free there when it failed. No earlier save there" in roomy


def test_save_errors_give_the_callers_fix_and_count_older_saves(tmp_path, monkeypatch):
    """A preparation cache or eaopd-convert's output is not fixed with training.* keys; 'delete
    older iter_* folders' is offered only where there are older ones."""
    from megatron_eaopd.models import save_errors

    for it in (2, 4):
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / "x").write_bytes(b"0" * 100)
    monkeypatch.setattr(save_errors, "free_bytes", lambda path: 10)
    done = ["iter_0000002", "iter_0000004"]
    text = save_errors.space_problem(str(tmp_path), "iter_0000006", done, "iter_0000004")
    assert "Make room (delete older iter_* folders there (1; training.keep_checkpoints" in text
    fix = "point teacher_prep.cache_dir at another disk"
    text = save_errors.space_problem(str(tmp_path), "iter_0000006", done, "iter_0000004", fix)
    assert text.endswith("Make room (free space on that disk) or " + fix)
    text = save_errors.write_failed("/c", "iter_0000001", 0, OSError(5, "io"), None, 0, fix)
    assert text.endswith("(a full disk or quota: free space there) or " + fix)
    assert "training." not in text
