"""One optimizer step of the trainer: a supervised step lowers the loss; a non-finite step is
skipped and counted and leaves weights and optimizer state untouched; too many in a row stop."""

from __future__ import annotations

import torch

from tests.dist import run_distributed

VOCAB = 24


def _worker(rank, world):
    from megatron_eaopd.models import ModelConfig
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.parallel.init import initialize_parallel
    from megatron_eaopd.trainer.batches import sft_micro_batches
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import (
        NonFiniteUpdateError,
        optimizer_step,
        sft_forward_step,
    )

    initialize_parallel(world, 1, seed=3)
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        vocab_size=VOCAB, max_sequence_length=16, make_vocab_size_divisible_by=8,
    )  # fmt: skip
    model = build_trainable(cfg, OptimConfig(lr=1e-2, total_steps=10), seed=0)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):
        ids = torch.randint(1, VOCAB, (10,), generator=gen).tolist()
        examples.append((ids, [0] * 4 + [1] * 6))
    micro, seq = sft_micro_batches(examples, 0, 2)
    good = sft_forward_step(VOCAB)

    def poisoned(data_iterator, module):
        output, loss_func = good(data_iterator, module)

        def nan_loss(logits):
            total, n, rep = loss_func(logits)
            return total * float("nan"), n, {"loss": rep["loss"] * float("nan")}

        return output, nan_loss

    def snapshot():
        return [p.detach().clone() for c in model.chunks for p in c.parameters()]

    losses = []
    for _ in range(3):
        applied = model.scheduler.get_lr(model.optimizer.param_groups[0])  # this step's lr
        m, _ = optimizer_step(model, good, micro, seq, 2, metric_names=["loss"])
        losses.append(m["loss"])
        assert m["skipped"] == 0.0 and abs(m["lr"] - applied) < 1e-12  # not the next step's
    before, lr_before = snapshot(), m["lr"]
    state_before = {k: v.clone() for k, v in _adam_state(model).items()}
    m, _ = optimizer_step(model, poisoned, micro, seq, 2, metric_names=["loss"])
    assert m["skipped"] == 1.0 and model.skipped_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot())), "weights changed"
    after_state = _adam_state(model)
    assert all(torch.equal(state_before[k], after_state[k]) for k in state_before)
    raised = False
    try:
        optimizer_step(model, poisoned, micro, seq, 2, skip_nonfinite=False, metric_names=["loss"])
    except NonFiniteUpdateError:
        raised = True
    assert raised
    m, _ = optimizer_step(model, good, micro, seq, 2, metric_names=["loss"])
    assert m["skipped"] == 0.0 and m["lr"] != lr_before  # the schedule moved on after the skip
    # a diverged model skipped every later update to the end of the run: the limit of skips
    # in a row stops it; an applied update in between starts the count again
    assert model.skipped_in_a_row == 0
    model.max_skipped_in_a_row = 2
    optimizer_step(model, poisoned, micro, seq, 2, metric_names=["loss"])
    optimizer_step(model, good, micro, seq, 2, metric_names=["loss"])
    optimizer_step(model, poisoned, micro, seq, 2, metric_names=["loss"])
    assert model.skipped_in_a_row == 1
    message = ""
    try:
        optimizer_step(model, poisoned, micro, seq, 2, metric_names=["loss"])
    except NonFiniteUpdateError as err:
        message = str(err)
    assert message.startswith("the last 2 updates were all skipped (non-finite: loss="), message
    assert "training.max_skipped_in_a_row=0 never stops" in message
    return losses


def _adam_state(model):
    opt = model.optimizer
    subs = getattr(opt, "chained_optimizers", [opt])
    out = {}
    for i, sub in enumerate(subs):
        for j, st in enumerate(sub.optimizer.state.values()):
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"{i}.{j}.{k}"] = v
    return out


def test_steps_lower_loss_and_nonfinite_updates_are_skipped():
    results = run_distributed(_worker, 2, timeout=240)
    losses = results[0]
    assert results[1] == losses  # the loss is reduced to the same value on every rank
    assert losses[2] < losses[0]


def _length_worker(rank, world):
    """The same preparation steps with two model lengths (what a teacher preparation's cache key
    no longer holds): the weights after them."""
    from megatron_eaopd.models import ModelConfig
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_parallel
    from megatron_eaopd.trainer.batches import sft_micro_batches
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import optimizer_step, sft_forward_step

    out = []
    for length in (16, 96):
        initialize_parallel(world, 1, seed=3)
        cfg = ModelConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            vocab_size=VOCAB, max_sequence_length=length, make_vocab_size_divisible_by=8,
        )  # fmt: skip
        model = build_trainable(cfg, OptimConfig(lr=1e-2, total_steps=10), seed=0)
        gen = torch.Generator().manual_seed(0)
        examples = [(torch.randint(1, VOCAB, (12,), generator=gen).tolist(), [0] * 4 + [1] * 8)
                    for _ in range(4)]  # fmt: skip
        micro, seq = sft_micro_batches(examples, 0, 2)
        for _ in range(2):
            optimizer_step(model, sft_forward_step(VOCAB), micro, seq, 2, metric_names=["loss"])
        out.append([p.detach().clone() for c in model.chunks for p in c.parameters()])
        destroy_parallel()
    return out


def test_the_model_length_does_not_change_what_a_preparation_trains():
    """max_sequence_length (derived from the rollout and evaluation limits) was part of the
    teacher / student preparation cache keys, so a new evaluation length prepared the teacher
    again; the trained weights do not depend on it (RoPE, no learned positions)."""
    short, long = run_distributed(_length_worker, 1, timeout=240)[0]
    assert len(short) == len(long) and all(torch.equal(a, b) for a, b in zip(short, long))
