"""Exact mode: teacher beside student on the same stages, full-vocabulary EOPD on the last stage.

One 4-process launch runs (tp, pp) = (1, 1) and (2, 2). At each layout: the exact-mode EOPD loss and
the student's gradients; the teacher's full-vocabulary entropy seen by the exact loss must equal the
payload path's (FrozenTeacher.score); the student's cross-entropy gradients with the teacher riding
along must equal those of the student alone. Across layouts, the EOPD losses and gradients agree.
"""

from __future__ import annotations

import torch

from tests.dist import run_distributed
from tests.models import helpers

NUM_MICROBATCHES, MICRO_BATCH, SEQ, K = 2, 2, 8, 4


def _eopd_forward_step(vocab_size, captured):
    from megatron.core import tensor_parallel

    from megatron_eaopd.losses import vocab_parallel_eopd_loss

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(pair):
            student, teacher = (x.transpose(0, 1).contiguous() for x in pair)  # [s, b, V/tp]
            per_token, metrics = vocab_parallel_eopd_loss(
                student, teacher, entropy_threshold=0.5, vocab_size=vocab_size
            )
            loss = per_token.mean()
            labels = batch["labels"].t().contiguous()
            ce = tensor_parallel.vocab_parallel_cross_entropy(student.float().clone(), labels)
            captured.append(
                {
                    "loss": loss.detach().clone(),
                    "ce": ce.mean().detach().clone(),
                    "teacher_entropy": metrics["teacher_entropy"].clone(),
                }
            )
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def _run(tp, pp, seed):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.exact import exact_pair_stages
    from megatron_eaopd.models.student import OptimConfig, run_forward_backward, setup_student
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import initialize_parallel

    s_cfg, t_cfg = helpers.preset("tiny-student"), helpers.preset("tiny-teacher")
    initialize_parallel(tp, pp, seed=seed)
    teacher = build_model(t_cfg)
    init_weights_layout_invariant(teacher, seed)
    teacher = FrozenTeacher(teacher)
    student = build_model(s_cfg)
    init_weights_layout_invariant(student, seed + 1)
    student = setup_student(student, OptimConfig(lr=1e-3))
    batches = helpers.make_batches(NUM_MICROBATCHES, MICRO_BATCH, SEQ, s_cfg.vocab_size, seed)
    args = (NUM_MICROBATCHES, SEQ, MICRO_BATCH)
    last = ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0

    # The student alone (cross-entropy), then the same with the teacher riding along.
    run_forward_backward(
        student.chunks, helpers.ce_forward_step(s_cfg.vocab_size), iter(batches), *args
    )
    alone = helpers.global_pieces(student.chunks, grads=True)
    stages = exact_pair_stages(student.chunks, teacher)
    for model in student.chunks:
        model.zero_grad_buffer()

    def ce_pair_step(data_iterator, model):
        output, loss_func = helpers.ce_forward_step(s_cfg.vocab_size)(data_iterator, model)
        return output, lambda pair: loss_func(pair[0])

    run_forward_backward(stages, ce_pair_step, iter(batches), *args)
    riding = helpers.global_pieces(student.chunks, grads=True)

    # Exact EOPD on the last stage.
    for model in student.chunks:
        model.zero_grad_buffer()
    captured: list = []
    run_forward_backward(
        stages, _eopd_forward_step(s_cfg.vocab_size, captured), iter(batches), *args
    )
    eopd_grads = helpers.global_pieces(student.chunks, grads=True)
    payload = teacher.score(batches, SEQ, MICRO_BATCH, payload_k=K, vocab_size=t_cfg.vocab_size)
    return {
        "last": last,
        "alone": alone,
        "riding": riding,
        "eopd_grads": eopd_grads,
        "captured": captured,
        "payload_entropy": [p.entropy.clone() for p in payload],
    }


def exact_worker(rank, world_size, seed):
    return [_run(1, 1, seed), _run(2, 2, seed)]


def test_exact_mode_matches_payload_path_and_layouts():
    results = run_distributed(exact_worker, 4, 13, timeout=240)
    per_layout = []
    for i in range(2):
        runs = [r[i] for r in results]
        last = [r for r in runs if r["last"]][0]
        assert len(last["captured"]) == NUM_MICROBATCHES
        for cap, entropy in zip(last["captured"], last["payload_entropy"]):
            torch.testing.assert_close(cap["teacher_entropy"], entropy, rtol=1e-5, atol=1e-6)
            assert torch.isfinite(cap["loss"]) and cap["loss"] > 0
        alone = helpers.assemble([r["alone"] for r in runs])
        riding = helpers.assemble([r["riding"] for r in runs])
        assert alone.keys() == riding.keys()
        for key in alone:
            torch.testing.assert_close(riding[key], alone[key], rtol=1e-6, atol=1e-8, msg=key)
        eopd = helpers.assemble([r["eopd_grads"] for r in runs])
        assert any(not torch.allclose(eopd[k], alone[k]) for k in eopd)
        per_layout.append((torch.stack([c["loss"] for c in last["captured"]]), eopd))
    (loss_a, grads_a), (loss_b, grads_b) = per_layout
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6, msg=key)
