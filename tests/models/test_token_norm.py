"""Loss normalised by the valid tokens of the global batch, whatever the DP x PP x TP split.

Four micro-batches with very different numbers of valid (unmasked) tokens form the global batch.
Reference: (tp, pp) = (2, 2), one replica, every micro-batch's masked cross-entropy sum divided by
the known global token count (plain mean mode). Then megatron's per-token mode
(calculate_per_token_loss, the loss function returns (sum, count)) at (1, 1) x dp 4, (2, 1) x dp 2
and (2, 2) x dp 1, each replica taking its share of the micro-batches: same gradients and the same
reported loss. A per-micro-batch mean would weight the nearly empty micro-batch like a full one
and fail.
"""

from __future__ import annotations

import torch

from tests.dist import run_distributed
from tests.models import helpers

MICRO_BATCH, SEQ, TOTAL_MB = 2, 12, 4
MASKED_PREFIX = (0, 4, 8, 11)  # tokens masked at the start of each micro-batch


def _global_batches(vocab):
    batches = helpers.make_batches(TOTAL_MB, MICRO_BATCH, SEQ, vocab, seed=5)
    for batch, masked in zip(batches, MASKED_PREFIX):
        mask = torch.ones(MICRO_BATCH, SEQ)
        mask[:, :masked] = 0
        batch["loss_mask"] = mask
    return batches


def _forward_step(per_token: bool, total_tokens: float):
    from megatron.core import tensor_parallel

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(logits):
            sb_logits = logits.float().transpose(0, 1).contiguous().clone()
            per_tok = tensor_parallel.vocab_parallel_cross_entropy(
                sb_logits, batch["labels"].t().contiguous()
            )
            mask = batch["loss_mask"].t()
            loss_sum, count = (per_tok * mask).sum(), mask.sum()
            metric = torch.stack([loss_sum.detach(), count]).clone()
            if per_token:
                return loss_sum, count.to(torch.int), {"loss": metric}
            # Mean mode divides by the number of micro-batches: undo it, use the global count.
            return loss_sum * TOTAL_MB / total_tokens, {"loss": metric}

        return output, loss_func

    return forward_step


def _run(tp, pp, per_token, seed):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import (
        OptimConfig,
        reduce_loss_metric,
        run_forward_backward,
        setup_student,
    )
    from megatron_eaopd.parallel.init import initialize_parallel

    cfg = helpers.preset("tiny-student")
    layout = initialize_parallel(tp, pp, seed=seed)
    chunks = build_model(cfg, calculate_per_token_loss=per_token)
    init_weights_layout_invariant(chunks, seed)
    student = setup_student(chunks, OptimConfig())
    batches = _global_batches(cfg.vocab_size)
    total_tokens = float(sum(b["loss_mask"].sum() for b in batches))
    share = TOTAL_MB // layout.dp
    mine = batches[ps.get_data_parallel_rank() * share : (ps.get_data_parallel_rank() + 1) * share]
    outputs = run_forward_backward(
        student.chunks, _forward_step(per_token, total_tokens), iter(mine), share, SEQ, MICRO_BATCH
    )
    return {
        "loss": float(reduce_loss_metric(outputs)),
        "grads": helpers.global_pieces(student.chunks, grads=True),
        "total_tokens": total_tokens,
    }


def token_norm_worker(rank, world_size, seed):
    runs = [(2, 2, False), (1, 1, True), (2, 1, True), (2, 2, True)]
    return [_run(tp, pp, per_token, seed) for tp, pp, per_token in runs]


def test_per_token_loss_over_the_global_batch():
    results = run_distributed(token_norm_worker, 4, 9, timeout=240)
    counts = [MICRO_BATCH * (SEQ - m) for m in MASKED_PREFIX]
    assert results[0][0]["total_tokens"] == sum(counts)
    reference = helpers.assemble([r[0]["grads"] for r in results])
    ref_loss = results[0][0]["loss"]
    for i in range(1, 4):
        assert all(abs(r[i]["loss"] - ref_loss) < 1e-5 for r in results), i
        grads = helpers.assemble([r[i]["grads"] for r in results])
        for key, value in grads.items():
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-7, msg=key)
    # The reported loss is the global token mean, not the mean of per-micro-batch means.
    assert all(abs(r[0]["loss"] - ref_loss) < 1e-6 for r in results)
