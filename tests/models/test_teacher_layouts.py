"""A teacher at its own layout scores the student's rollouts: TP=2 PP=2 teacher, TP=2 PP=1 student.

One 4-process launch registers three layouts on the same ranks: the student (2, 1) with two
data-parallel replicas, the teacher (2, 2), and a (1, 1) reference. The teacher's payload for each
student replica must equal what a (1, 1) copy of the same teacher gives on that replica's batches,
computed with plain torch (log_softmax over the real vocabulary). The student must still train
under its own layout afterwards.
"""

from __future__ import annotations

import torch

from tests.dist import run_distributed
from tests.models import helpers

K, NUM_MICROBATCHES, MICRO_BATCH, SEQ = 4, 2, 2, 8


def layouts_worker(rank, world_size, seed):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig, setup_student, train_step
    from megatron_eaopd.models.teacher import FrozenTeacher, score_for_student
    from megatron_eaopd.parallel.init import initialize_layouts, use_layout

    teacher_cfg, student_cfg = helpers.preset("tiny-teacher"), helpers.preset("tiny-student")
    layouts = initialize_layouts(
        {"student": (2, 1, None), "teacher": (2, 2, None), "reference": (1, 1, None)}, seed=seed
    )
    assert (layouts["student"].dp, layouts["teacher"].dp, layouts["reference"].dp) == (2, 1, 4)
    assert ps.get_tensor_model_parallel_world_size() == 2
    assert ps.get_pipeline_model_parallel_world_size() == 1  # the student is active
    with use_layout("teacher"):
        assert ps.get_pipeline_model_parallel_world_size() == 2
        teacher_chunks = build_model(teacher_cfg)
        init_weights_layout_invariant(teacher_chunks, seed)
        teacher = FrozenTeacher(teacher_chunks)
    assert ps.get_pipeline_model_parallel_world_size() == 1

    student_chunks = build_model(student_cfg)
    init_weights_layout_invariant(student_chunks, seed + 1)
    student = setup_student(student_chunks, OptimConfig(lr=1e-3))
    dp_rank = ps.get_data_parallel_rank()
    batches = helpers.make_batches(
        NUM_MICROBATCHES, MICRO_BATCH, SEQ, student_cfg.vocab_size, seed=100 + dp_rank
    )
    payloads = score_for_student(teacher, batches, k=K, vocab_size=teacher_cfg.vocab_size)

    # Reference: the same teacher at (1, 1), this rank's batches, plain torch statistics.
    with use_layout("reference"):
        reference = build_model(teacher_cfg)
        init_weights_layout_invariant(reference, seed)
        reference = FrozenTeacher(reference)
        ref_payloads = []
        for batch in batches:
            logits = reference(batch["tokens"], batch["position_ids"], None)  # [b, s, V_pad]
            logp = torch.log_softmax(logits[..., : teacher_cfg.vocab_size].float(), -1)
            logp = logp.transpose(0, 1)  # [s, b, V]
            top = logp.topk(K, dim=-1)
            ref_payloads.append(
                (
                    -(logp.exp() * logp).sum(-1),
                    logp.gather(-1, batch["labels"].t().unsqueeze(-1)).squeeze(-1),
                    top.values,
                    top.indices,
                )
            )

    step = train_step(
        student,
        helpers.ce_forward_step(student_cfg.vocab_size),
        iter(batches),
        NUM_MICROBATCHES,
        SEQ,
        MICRO_BATCH,
    )
    return {
        "dp_rank": dp_rank,
        "payloads": [tuple(p) for p in payloads],
        "reference": ref_payloads,
        "step": step,
    }


def test_teacher_tp2pp2_scores_for_student_tp2pp1():
    results = run_distributed(layouts_worker, 4, 21, timeout=240)
    assert sorted(r["dp_rank"] for r in results) == [0, 0, 1, 1]
    for r in results:
        assert len(r["payloads"]) == NUM_MICROBATCHES
        for got, ref in zip(r["payloads"], r["reference"]):
            entropy, token_lp, top_lp, top_ids = got
            assert entropy.shape == (SEQ, MICRO_BATCH) and top_ids.shape == (SEQ, MICRO_BATCH, K)
            assert top_ids.dtype == torch.int64
            torch.testing.assert_close(entropy, ref[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(token_lp, ref[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(top_lp, ref[2], rtol=1e-5, atol=1e-5)
            assert torch.equal(top_ids, ref[3])
        assert not r["step"]["skipped"] and torch.isfinite(torch.tensor(r["step"]["loss"]))
    # The two student replicas scored different rollouts.
    by_dp = {r["dp_rank"]: r["payloads"][0][0] for r in results}
    assert not torch.equal(by_dp[0], by_dp[1])


# (student (tp, pp), teacher (tp, pp)) on 4 ranks; replica i holds micro-batches of the rows
# ROWS[i] and widths WIDTHS[i] (a replica with none included; shapes differing on one rank, as the
# trainer's length-sorted micro-batches under a token budget do: under the teacher's PP 2 the
# schedule sends shapes)
UNEVEN = [((1, 2), (2, 1)), ((1, 1), (1, 2)), ((2, 1), (2, 1))]
ROWS, WIDTHS = [[2, 3, 1], [], [3], [1, 2]], [[7, 3, 5], [], [5], [9, 2]]
COUNTS = [len(w) for w in WIDTHS]


def uneven_worker(rank, world_size, seed):
    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.scoring import payload_bytes_per_position, score_for_student
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel import exchange
    from megatron_eaopd.parallel.init import initialize_layouts, use_layout

    cfg = helpers.preset("tiny-teacher")
    names = {}
    for i, (s, t) in enumerate(UNEVEN):
        names[f"s{i}"], names[f"t{i}"] = (*s, None), (*t, None)
    layouts = initialize_layouts({**names, "reference": (1, 1, None)}, seed=seed)
    with use_layout("reference"):
        reference = FrozenTeacher(build_model(cfg))
        init_weights_layout_invariant(reference.chunks, seed)
    out = []
    for i in range(len(UNEVEN)):
        with use_layout(f"t{i}"):
            teacher = FrozenTeacher(build_model(cfg))
            init_weights_layout_invariant(teacher.chunks, seed)
        lay = layouts[f"s{i}"]
        replica = lay.dp_rank
        batches = [mb for m, (rows, width) in enumerate(zip(ROWS[replica], WIDTHS[replica]))
                   for mb in helpers.make_batches(1, rows, width, cfg.vocab_size,
                                                  seed=10 * replica + m)]  # fmt: skip
        exchange.TRAFFIC.update(sent={}, received={})
        got = score_for_student(
            teacher, batches, k=K, vocab_size=cfg.vocab_size, teacher_layout=f"t{i}",
            student_layout=f"s{i}",
        )  # fmt: skip
        received = dict(exchange.TRAFFIC["received"])
        own = sum(b["tokens"].numel() for b in batches) * payload_bytes_per_position(K)
        errors = []
        with use_layout("reference"):
            for batch, payload in zip(batches, got):
                if payload is None:
                    continue
                logits = reference(batch["tokens"], batch["position_ids"], None)
                logp = torch.log_softmax(logits[..., : cfg.vocab_size].float(), -1).transpose(0, 1)
                errors.append(
                    max(
                        (payload.entropy + (logp.exp() * logp).sum(-1)).abs().max().item(),
                        (payload.topk_logprobs - logp.topk(K, -1).values).abs().max().item(),
                    )
                )
                assert torch.equal(payload.topk_ids, logp.topk(K, -1).indices)
        out.append(
            {
                "last": lay.is_last_stage, "count": len(got), "none": sum(p is None for p in got),
                "errors": errors, "payload_bytes": received.get("float32", 0), "own": own,
                "expected_count": COUNTS[replica],
            }
        )  # fmt: skip
    return out


def test_uneven_replicas_get_only_their_own_payload():
    results = run_distributed(uneven_worker, 4, 23, timeout=300)
    for case in range(len(UNEVEN)):
        checked = 0
        for r in (res[case] for res in results):
            assert r["count"] == r["expected_count"]
            if r["last"]:
                assert r["none"] == 0 and len(r["errors"]) == r["count"]
                assert all(e < 1e-5 for e in r["errors"]), r["errors"]
                checked += len(r["errors"])
                # no more payload than its own micro-batches' (less when scored on this rank)
                assert r["payload_bytes"] <= r["own"]
            else:  # earlier student stages compute no loss and receive no payload
                assert r["none"] == r["count"] and r["payload_bytes"] == 0
        assert checked > 0
