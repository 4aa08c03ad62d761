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
    step_micro_batches,
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


def test_step_micro_batches_sort_each_group_and_cut_each_to_its_longest_row():
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(3)
    prompt = torch.tensor([2, 3, 2, 4, 2, 2, 5, 3, 2, 2, 3, 2])
    response = torch.tensor([9, 1, 4, 12, 1, 1, 2, 7, 1, 3, 1, 1])
    r = random_rollouts(prompt, response, 50, gen)
    full = collate(r, PAD, multiple=4)
    grouped = step_micro_batches(r, PAD, 2, groups=2, multiple=4)
    assert [len(group) for group in grouped] == [3, 3]
    micro = [mb for group in grouped for mb in group]
    widest = max(mb["tokens"].shape[1] for mb in micro)
    assert len(micro) == 6 and widest == full["tokens"].shape[1] == 16
    lengths = (prompt + response).tolist()
    seen = []
    for m, mb in enumerate(micro):
        group = range(0, 6) if m < 3 else range(6, 12)
        # the rows of this micro-batch, found by their tokens in the padded batch
        rows = [next(i for i in group if torch.equal(full["tokens"][i, : mb["tokens"].shape[1]],
                                                     mb["tokens"][j]) and i not in seen)
                for j in range(2)]  # fmt: skip
        seen += rows
        width = mb["tokens"].shape[1]
        assert width % 4 == 0 and width - 4 < max(lengths[i] for i in rows) <= width
        for key, value in mb.items():
            assert torch.equal(value, full[key][rows, :width]), key
            # nothing the loss reads is cut off
        assert int(mb["loss_mask"].sum()) == int(full["loss_mask"][rows].sum())
    assert sorted(seen) == list(range(12))
    # longest first within each group (ties keep their order)
    assert [lengths[i] for i in seen[:6]] == sorted((lengths[i] for i in range(6)), reverse=True)
    assert [lengths[i] for i in seen[6:]] == sorted((lengths[i] for i in range(6, 12)),
                                                    reverse=True)  # fmt: skip
    assert seen[4:6] == [4, 5] and seen[10:12] == [8, 11]  # equal lengths 3: stable
    with pytest.raises(ValueError, match="equal groups"):
        step_micro_batches(r, PAD, 2, groups=5)
    with pytest.raises(ValueError, match="micro-batches of 4"):
        step_micro_batches(r, PAD, 4, groups=2)


@pytest.mark.parametrize(
    "budget,cap,multiple", [(40, 8, 1), (40, 3, 1), (64, 16, 4), (17, 4, 1), (10, 4, 1)]
)
def test_token_budget_micro_batches_fill_each_to_the_budget_longest_first(budget, cap, multiple):
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(budget + cap)
    groups, per_group = 3, 10
    prompt = torch.randint(2, 6, (groups * per_group,), generator=gen)
    response = torch.randint(0, 12, (groups * per_group,), generator=gen)
    r = random_rollouts(prompt, response, 50, gen)
    r.tokens[:, 0] = torch.arange(1, groups * per_group + 1)  # a row's id: its first token
    full = collate(r, PAD, multiple=multiple)
    lengths = (prompt + response).tolist()
    grouped = step_micro_batches(r, PAD, cap, groups=groups, multiple=multiple, max_tokens=budget)
    assert len(grouped) == groups
    for g, micro in enumerate(grouped):
        left = sorted(range(g * per_group, (g + 1) * per_group), key=lambda i: -lengths[i])
        for mb in micro:
            rows = (mb["tokens"][:, 0] - 1).tolist()
            b, width = mb["tokens"].shape
            longest = max(lengths[i] for i in rows)
            assert width == -(-longest // multiple) * multiple  # its own longest row
            # within the budget and the row cap, and as full as both allow
            assert b <= cap and (b * width <= budget or b == 1)
            assert b == min(cap, len(left), max(1, budget // width))
            # longest first: the rows are the next b of the group in length order
            assert sorted(lengths[i] for i in rows) == sorted(lengths[i] for i in left[:b])
            left = [i for i in left if i not in rows] if set(rows) <= set(left) else None
            assert left is not None, "a row twice"
            for key, value in mb.items():
                assert torch.equal(value, full[key][rows, :width]), key
        assert left == []
    micro = [mb for group in grouped for mb in group]
    assert max(mb["tokens"].shape[1] for mb in micro) == full["tokens"].shape[1]
    if budget < max(lengths):  # rows longer than the budget: one micro-batch each
        assert any(mb["tokens"].shape[1] > budget for mb in micro)
    with pytest.raises(ValueError, match="max_tokens"):
        step_micro_batches(r, PAD, cap, max_tokens=0)


def test_shapes_differ_sees_rows_and_widths():
    from megatron_eaopd.models.student import shapes_differ

    def mbs(*shapes):
        return [{"tokens": torch.zeros(b, s, dtype=torch.long)} for b, s in shapes]

    assert not shapes_differ(mbs((4, 10), (4, 10)), 10, 4)
    assert shapes_differ(mbs((4, 10), (2, 10)), 10, 4)  # rows differ, one width
    assert shapes_differ(mbs((4, 10), (4, 8)), 10, 4)
    assert shapes_differ(mbs((2, 10), (2, 10)), 10, 4)  # not the schedule's micro_batch_size
    assert shapes_differ(mbs((4, 8)), 10, 4)  # not its seq_length
    assert not shapes_differ(mbs((2, 8), (2, 8)))
    assert not shapes_differ([], 10, 4)
