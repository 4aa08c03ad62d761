"""Layouts added next to a caller's parallel state keep the caller's groups and RNG intact, and
the teacher exchange reports a bad input on every rank instead of leaving some in a collective."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers


def added_layout_worker(rank, world):
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_eaopd.parallel.init import (
        add_layout,
        initialize_parallel,
        register_current_layout,
        use_layout,
    )

    initialize_parallel(tp=1, pp=1, seed=3)  # the caller's own state: DP 2
    # the caller's default group waits 7 minutes (Megatron-LM: --distributed-timeout-minutes)
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=7), dist.group.WORLD)
    register_current_layout("mine")
    gloo = ps.get_data_parallel_group_gloo()
    cpu_state = torch.get_rng_state()
    tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    add_layout("other", 2, 1)
    out = {"tp_after": ps.get_tensor_model_parallel_world_size()}
    out["rng_kept"] = torch.equal(torch.get_rng_state(), cpu_state) and all(
        torch.equal(v, tracker[k]) for k, v in get_cuda_rng_tracker().get_states().items()
    )
    t = torch.ones(1)
    dist.all_reduce(t, group=gloo)  # the caller's gloo group still works
    out["gloo_sum"] = float(t)
    with use_layout("other"):
        out["tp_other"] = ps.get_tensor_model_parallel_world_size()
        # the added groups take the caller's timeout (7 minutes here, not a fixed 30)
        group = ps.get_tensor_model_parallel_group()
        out["timeout"] = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    out["dp_gloo_rank"] = dist.get_rank(group=ps.get_data_parallel_group_gloo())
    return out


def test_add_layout_keeps_the_callers_groups_and_rng():
    for r in run_distributed(added_layout_worker, 2, timeout=240):
        assert r["tp_after"] == 1 and r["tp_other"] == 2
        assert r["rng_kept"] and r["gloo_sum"] == 2.0 and r["dp_gloo_rank"] in (0, 1)
        assert r["timeout"] == 7 * 60


def wrong_gpu_worker(rank, world):
    """A caller's NCCL job whose processes never called torch.cuda.set_device (every one on GPU
    0 of 4), as the CUDA calls would answer it: add_layout's initialize_distributed warns on
    every rank but LOCAL_RANK 0's (whose GPU 0 is its own). Returns the warnings."""
    from megatron_eaopd.parallel import init

    saved = (torch.cuda.is_available, torch.cuda.current_device, torch.cuda.device_count,
             init.uses_nccl, init.logger.warning)  # fmt: skip
    warned = [] if not init.uses_nccl() else ["gloo read as NCCL"]  # the real reading first
    torch.cuda.is_available, torch.cuda.current_device = (lambda: True), (lambda: 0)
    torch.cuda.device_count, init.uses_nccl = (lambda: 4), (lambda: True)
    init.logger.warning = lambda fmt, *args: warned.append(fmt % args)
    try:
        init.initialize_distributed()
    finally:
        (torch.cuda.is_available, torch.cuda.current_device, torch.cuda.device_count,
         init.uses_nccl, init.logger.warning) = saved  # fmt: skip
    return warned


def test_a_running_nccl_job_on_the_wrong_gpu_is_warned_about():
    from megatron_eaopd.parallel.init import device_problem

    got = run_distributed(wrong_gpu_worker, 2, timeout=240)
    assert got[0] == []  # LOCAL_RANK 0 on GPU 0
    assert len(got[1]) == 1 and "(LOCAL_RANK 1) uses GPU 0 of the 4 visible, not GPU 1" in got[1][0]
    assert "torch.cuda.set_device(int(os.environ['LOCAL_RANK']) % torch.cuda" in got[1][0]
    assert device_problem("5", 1, 4) is not None  # 5 % 4: GPU 1, which LOCAL_RANK 1 has
    assert "a lower local rank uses too" in device_problem("5", 1, 4)
    assert device_problem("1", 1, 4) is None
    assert device_problem("3", 0, 1) is None  # one GPU per process (srun --gpus-per-task=1)
    assert device_problem(None, 0, 8) is None and device_problem("", 0, 8) is None
    assert "not GPU 2" in device_problem("2", 0, 8)


def bad_input_worker(rank, world):
    from megatron_eaopd.models.builder import build_model
    from megatron_eaopd.models.scoring import score_for_student
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import initialize_layouts, use_layout

    cfg = helpers.preset("tiny-teacher")
    initialize_layouts({"student": (1, 1, None), "teacher": (2, 1, None)})
    with use_layout("teacher"):
        teacher = FrozenTeacher(build_model(cfg))
    messages = {}
    cases = ("shapes", "token id", "masked label", "labels shape", "no tokens", "packed")
    for case in cases:
        batches = helpers.make_batches(2, 2, 6, cfg.vocab_size)
        if rank == 1 and case == "shapes":  # one rank passes [b, s, 1] tokens
            batches[1]["tokens"] = batches[1]["tokens"][..., None]
        if rank == 0 and case == "token id":  # one token beyond the vocabulary, on rank 0 only
            batches[1]["tokens"][0, 3] = cfg.vocab_size
        if rank == 1 and case == "masked label":  # -100 (another framework's ignore index)
            for mb in batches:
                mb["labels"][:, -1] = -100
                mb["loss_mask"] = torch.ones_like(mb["labels"], dtype=torch.bool)
                mb["loss_mask"][:, -1] = False
        if rank == 1 and case == "labels shape":
            batches[0]["labels"] = batches[0]["labels"][:, :-1]
        if rank == 0 and case == "no tokens":  # Megatron-LM's get_batch on a last PP stage
            batches[0]["tokens"] = None
        if rank == 1 and case == "packed":
            batches[1]["packed_seq_params"] = object()
        try:
            score_for_student(teacher, batches, k=4, vocab_size=cfg.vocab_size)
            messages[case] = None
        except ValueError as err:
            messages[case] = str(err)
    return messages


def test_a_bad_input_on_one_rank_is_an_error_on_every_rank():
    for messages in run_distributed(bad_input_worker, 2, timeout=240):
        assert "rank 1: tokens that are not [b, s]" in messages["shapes"]
        assert "rank 0: token or label ids outside [0, vocab_size=" in messages["token id"]
        assert "rank 1: token or label ids outside" in messages["masked label"]
        assert "rank 1: labels of another shape than tokens" in messages["labels shape"]
        assert "rank 0: micro-batches without tokens or labels" in messages["no tokens"]
        assert "rank 1: packed sequences" in messages["packed"]


@pytest.mark.parametrize("extra", [["parallel.teacher.pp=2", "parallel.teacher.vpp=2",
                                    "model.teacher.layers=4"]])  # fmt: skip
def test_trainer_refuses_an_interleaved_teacher(extra, monkeypatch, capsys):
    from megatron_eaopd.cli import main
    from tests.trainer.common import CONFIG

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", CONFIG, *extra]) == 2
    assert "parallel.teacher.vpp must be null" in capsys.readouterr().err
