"""The same code on one CUDA device (nccl, one process): run with `pytest -m gpu tests/models`.

Checks that the CPU layer stays off, everything lives on the GPU, the student trains, checkpoints
round-trip, the teacher's scoring and payload match torch references, the payload routing and the
exact mode run. Not part of the CPU suite (marker `gpu`).
"""

from __future__ import annotations

import pytest
import torch

from tests.models import helpers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SEQ, MBS, NMB, K = 16, 2, 2, 4


def _on(device, batches):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def test_models_on_one_gpu(tmp_path, monkeypatch):
    import torch.distributed as dist

    from megatron_eaopd.compat.cpu import enable_cpu_compat, is_cpu_compat_enabled
    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.checkpoint import load_teacher, save_checkpoint
    from megatron_eaopd.models.exact import exact_pair_stages
    from megatron_eaopd.models.student import (
        OptimConfig,
        run_forward_backward,
        setup_student,
        train_step,
    )
    from megatron_eaopd.models.teacher import FrozenTeacher, score_for_student
    from megatron_eaopd.parallel.init import compute_device, initialize_layouts
    from tests.dist import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert enable_cpu_compat() is False and not is_cpu_compat_enabled()
    initialize_layouts({"student": (1, 1, None), "teacher": (1, 1, None)}, seed=3)
    assert dist.get_backend() == "nccl"
    device = compute_device()
    assert device.type == "cuda"

    cfg = helpers.preset("tiny-student")
    chunks = build_model(cfg)
    init_weights_layout_invariant(chunks, 3)
    assert all(p.device.type == "cuda" for p in chunks[0].parameters())
    student = setup_student(chunks, OptimConfig(lr=1e-2, total_steps=10, clip_grad=1.0))
    batches = _on(device, helpers.make_batches(NMB, MBS, SEQ, cfg.vocab_size, seed=1))

    captured: list = []
    run_forward_backward(
        student.chunks, helpers.ce_forward_step(cfg.vocab_size, captured), iter(batches),
        NMB, SEQ, MBS,
    )  # fmt: skip
    for cap in captured:
        torch.testing.assert_close(cap["loss"], cap["torch_loss"], rtol=1e-4, atol=1e-4)
    losses = []
    for _ in range(4):
        out = train_step(
            student, helpers.ce_forward_step(cfg.vocab_size), iter(batches), NMB, SEQ, MBS
        )
        assert not out["skipped"]
        losses.append(out["loss"])
    assert losses[-1] < losses[0], losses

    root = str(tmp_path / "ckpt")
    save_checkpoint(root, 4, student.chunks, student.optimizer, student.scheduler, {"pos": 8})
    teacher = FrozenTeacher(build_model(cfg))
    assert load_teacher(root, teacher).extra == {"pos": 8}
    logits = teacher.score(batches, SEQ, MBS)
    payload = teacher.score(batches, SEQ, MBS, payload_k=K, vocab_size=cfg.vocab_size)
    module = student.chunks[0].module
    module.eval()
    with torch.no_grad():
        for batch, got, pay in zip(batches, logits, payload):
            ref = module(batch["tokens"], batch["position_ids"], None).transpose(0, 1).float()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            logp = torch.log_softmax(ref[..., : cfg.vocab_size], -1)
            torch.testing.assert_close(pay.entropy, -(logp.exp() * logp).sum(-1), rtol=1e-4,
                                       atol=1e-5)  # fmt: skip
            torch.testing.assert_close(pay.topk_logprobs, logp.topk(K, -1).values, rtol=1e-4,
                                       atol=1e-5)  # fmt: skip
    module.train()
    routed = score_for_student(teacher, batches, k=K, vocab_size=cfg.vocab_size)
    for a, b in zip(routed, payload):
        torch.testing.assert_close(a.entropy, b.entropy)
        assert torch.equal(a.topk_ids, b.topk_ids)

    stages = exact_pair_stages(student.chunks, teacher)

    def pair_step(data_iterator, model):
        output, loss_func = helpers.ce_forward_step(cfg.vocab_size)(data_iterator, model)
        return output, lambda pair: loss_func(pair[0])

    out = run_forward_backward(stages, pair_step, iter(batches), NMB, SEQ, MBS)
    assert len(out) == NMB and all(torch.isfinite(o["loss"]) for o in out)


def test_distributed_optimizer_matches_plain_on_gpu(monkeypatch):
    """guarded_optimizer_step with megatron's DistributedOptimizer (needs CUDA tensors)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig, setup_student, train_step
    from megatron_eaopd.parallel.init import compute_device, initialize_parallel
    from tests.dist import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    initialize_parallel(1, 1, seed=5)
    cfg = helpers.preset("tiny-student")
    runs = {}
    for distributed in (False, True):
        chunks = build_model(cfg)
        init_weights_layout_invariant(chunks, 5)
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed
        )
        optim = OptimConfig(lr=5e-3, weight_decay=0.1, warmup_steps=1, total_steps=5, clip_grad=0.5)
        student = setup_student(chunks, optim, ddp_config=ddp)
        steps = []
        for step in range(3):
            batches = _on(
                compute_device(), helpers.make_batches(NMB, MBS, SEQ, cfg.vocab_size, seed=step)
            )
            fwd = helpers.ce_forward_step(cfg.vocab_size)
            steps.append(train_step(student, fwd, iter(batches), NMB, SEQ, MBS))
        weights = {n: p.detach().clone() for n, p in student.chunks[0].module.named_parameters()}
        runs[distributed] = (steps, weights)
    (plain_steps, plain_w), (zero_steps, zero_w) = runs[False], runs[True]
    assert plain_steps[0]["grad_norm"] > 0.5  # the clip was active
    for a, b in zip(plain_steps, zero_steps):
        assert not a["skipped"] and not b["skipped"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    for name in plain_w:
        torch.testing.assert_close(zero_w[name], plain_w[name], rtol=1e-5, atol=1e-6, msg=name)
