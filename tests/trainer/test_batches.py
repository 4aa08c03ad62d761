"""Label alignment of rollouts into micro-batches, and the teacher payload join."""

from __future__ import annotations

import pytest
import torch

from megatron_eaopd.losses import TeacherPayload
from megatron_eaopd.rollout import RolloutBatch
from megatron_eaopd.trainer.batches import (
    attach_teacher,
    collate,
    sft_micro_batches,
    split_micro_batches,
)

PAD = 0


def _rollouts():
    # row 0: prompt [1, 5, 6], response [7, 8, 3] (EOS 3); row 1: prompt [1, 9], response [4]
    tokens = torch.tensor([[1, 5, 6, 7, 8, 3], [1, 9, 4, PAD, PAD, PAD]])
    logprobs = torch.tensor([[0, 0, 0, -0.1, -0.2, -0.3], [0, 0, -0.4, 0, 0, 0]])
    return RolloutBatch(
        tokens=tokens,
        prompt_lens=torch.tensor([3, 2]),
        response_lens=torch.tensor([3, 1]),
        logprobs=logprobs,
        entropies=torch.zeros(2, 6),
        finished=torch.tensor([True, False]),
    )


def test_collate_aligns_labels_masks_and_old_logprobs():
    r = _rollouts()
    b = collate(r, PAD, seq_len=8)
    assert b["tokens"].shape == (2, 8)
    # the logits at position t predict tokens[t + 1]
    assert torch.equal(b["labels"][:, :5], r.tokens[:, 1:])
    assert b["loss_mask"][0].tolist() == [False, False, True, True, True, False, False, False]
    assert b["loss_mask"][1].tolist() == [False, True] + [False] * 6
    # the old log-prob at t is that of the label (the token at t + 1)
    for i in range(2):
        m = b["loss_mask"][i]
        assert torch.equal(b["old_logprobs"][i][m], r.logprobs[i][r.response_mask()[i]])
        assert (b["old_logprobs"][i][~m] == 0).all()
    assert torch.equal(b["position_ids"][1], torch.arange(8))
    with pytest.raises(ValueError, match="shorter"):
        collate(r, PAD, seq_len=4)


def test_split_and_attach_teacher_transposes_payload():
    b = collate(_rollouts(), PAD)
    micro = split_micro_batches(b, 1)
    assert len(micro) == 2 and torch.equal(micro[1]["tokens"], b["tokens"][1:])
    s, k = b["tokens"].shape[1], 3
    payloads = [
        TeacherPayload(
            torch.full((s, 1), float(i)), torch.zeros(s, 1), torch.zeros(s, 1, k),
            torch.arange(s * k).reshape(s, 1, k),
        )
        for i in range(2)
    ]  # fmt: skip
    attach_teacher(micro, payloads)
    t = micro[1]["teacher"]
    assert t.entropy.shape == (1, s) and (t.entropy == 1).all()
    assert t.topk_ids.shape == (1, s, k) and t.topk_ids[0, 2].tolist() == [6, 7, 8]
    with pytest.raises(ValueError, match="split"):
        split_micro_batches(b, 3)


def test_sft_micro_batches_mask_solution_and_eos_only():
    examples = [([1, 5, 6, 7, 3], [0, 0, 0, 1, 1]), ([1, 8, 3], [0, 0, 1])]
    micro, s = sft_micro_batches(examples, PAD, 2)
    (mb,) = micro
    assert s == 5
    assert mb["labels"][0].tolist() == [5, 6, 7, 3, PAD]
    assert mb["loss_mask"][0].tolist() == [False, False, True, True, False]
    assert mb["loss_mask"][1].tolist() == [False, True, False, False, False]
