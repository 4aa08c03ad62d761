"""Same weights, same logits, loss and gradients at every TP x PP (x VPP) layout.

One 4-process gloo launch runs every layout in turn (re-initialising megatron's parallel state):
(tp, pp) = (1,1), (2,1), (1,2), (2,2) for the tied-embedding student and an untied teacher shape
with interleaved PP (pp=2, vpp=2). Layouts with fewer than 4 model-parallel ranks are data parallel
over the rest, every replica fed the same batches, so DP averaging must leave the gradients equal.
References: logits/grads of the (1,1) layout, and torch's cross_entropy on the gathered logits.
"""

from __future__ import annotations

import torch

from tests.dist import run_distributed
from tests.models import helpers

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None)]
VPP_LAYOUTS = [(1, 1, None), (1, 2, 2), (2, 2, None)]
NUM_MICROBATCHES, MICRO_BATCH, SEQ = 2, 2, 12


def _run_layout(name, tp, pp, vpp, seed):
    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig, run_forward_backward, setup_student
    from megatron_eaopd.parallel.init import initialize_parallel

    cfg = helpers.preset(name)
    layout = initialize_parallel(tp, pp, vpp, seed=seed)
    chunks = build_model(cfg)
    init_weights_layout_invariant(chunks, seed)
    weights = helpers.global_pieces(chunks)
    student = setup_student(chunks, OptimConfig(lr=1e-3))
    batches = helpers.make_batches(NUM_MICROBATCHES, MICRO_BATCH, SEQ, cfg.vocab_size, seed)
    captured: list = []
    outputs = run_forward_backward(
        student.chunks,
        helpers.ce_forward_step(cfg.vocab_size, captured),
        helpers.chunk_iterators(batches, len(chunks)),
        NUM_MICROBATCHES,
        SEQ,
        MICRO_BATCH,
    )
    grads = helpers.global_pieces(student.chunks, grads=True)
    return {
        "layout": (layout.tp, layout.pp, layout.vpp, layout.dp),
        "last": layout.is_last_stage and layout.dp_rank == 0,
        "losses": [o["loss"] for o in outputs],
        "captured": captured,
        "weights": weights,
        "grads": grads,
    }


def parity_worker(rank, world_size, name, layouts, seed):
    return [_run_layout(name, tp, pp, vpp, seed) for tp, pp, vpp in layouts]


def _check_layouts(results_by_rank, num_layouts, vocab_size):
    reference = None
    for i in range(num_layouts):
        per_rank = [r[i] for r in results_by_rank]
        last = [r for r in per_rank if r["last"]]
        assert len(last) >= 1, per_rank[0]["layout"]
        first_last = last[0]
        losses = torch.stack(first_last["losses"])
        assert losses.shape == (NUM_MICROBATCHES,)
        for cap in first_last["captured"]:
            assert cap["logits"].shape == (MICRO_BATCH, SEQ, vocab_size)
            torch.testing.assert_close(cap["loss"], cap["torch_loss"], rtol=1e-5, atol=1e-5)
        state = {
            "losses": losses,
            "logits": torch.stack([c["logits"] for c in first_last["captured"]]),
            "weights": helpers.assemble([r["weights"] for r in per_rank]),
            "grads": helpers.assemble([r["grads"] for r in per_rank]),
        }
        if reference is None:
            reference = state
            assert len(state["grads"]) > 5
            for key, grad in state["grads"].items():
                assert grad.abs().sum() > 0, f"no gradient reached {key}"
            for key, weight in state["weights"].items():  # the layout-invariant initialisation
                centre = 1.0 if key.endswith(("norm_weight", "norm.weight")) else 0.0
                assert abs(weight.mean() - centre) < 0.02 and 0.01 < weight.std() < 0.03, key
            continue
        layout = per_rank[0]["layout"]
        assert state["weights"].keys() == reference["weights"].keys(), layout
        for key, value in state["weights"].items():
            assert torch.equal(value, reference["weights"][key]), (layout, key)
        torch.testing.assert_close(state["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
        assert state["grads"].keys() == reference["grads"].keys(), layout
        for key, value in state["grads"].items():
            torch.testing.assert_close(
                value, reference["grads"][key], rtol=1e-4, atol=1e-6, msg=f"{layout} {key}"
            )


def test_student_tied_same_loss_logits_grads_across_layouts():
    results = run_distributed(parity_worker, 4, "tiny-student", LAYOUTS, 11, timeout=240)
    _check_layouts(results, len(LAYOUTS), helpers.preset("tiny-student").vocab_size)


def test_teacher_untied_same_across_layouts_including_vpp():
    results = run_distributed(parity_worker, 4, "tiny-teacher", VPP_LAYOUTS, 5, timeout=240)
    _check_layouts(results, len(VPP_LAYOUTS), helpers.preset("tiny-teacher").vocab_size)
