"""From rollouts to megatron micro-batches: label alignment, masks, mini-batch split, payload join.

A rollout row holds ``tokens[t]`` with the prompt in ``[0, p)`` and the response in ``[p, p + r)``.
megatron's GPTModel predicts position t + 1 from position t, so every per-token field of a
micro-batch is *label-aligned*: ``labels[t] = tokens[t + 1]``, ``loss_mask[t]`` is True when
``t + 1`` is a response position, and ``old_logprobs[t] = log p_old(tokens[t + 1])``. These are
the ``token_ids`` / ``loss_mask`` / ``old_logprobs`` of ``megatron_eaopd.losses.DistillMicroBatch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_eaopd.losses import TeacherPayload
from megatron_eaopd.rollout import RolloutBatch

__all__ = [
    "attach_teacher",
    "collate",
    "on_device",
    "split_micro_batches",
    "step_micro_batches",
    "sft_micro_batches",
]


def on_device(mb: dict) -> dict:
    """The micro-batch with its tensors (and a TeacherPayload's) on the compute device (the
    current CUDA device with CUDA, else the CPU): rollouts and collated batches are built on the
    CPU. No copy when they are there already."""
    from megatron_eaopd.parallel.init import compute_device

    device = compute_device()

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, TeacherPayload):
            return TeacherPayload(*(f.to(device, non_blocking=True) for f in v))
        return v

    return {k: move(v) for k, v in mb.items()}


def collate(
    rollouts: RolloutBatch, pad_id: int, seq_len: int | None = None, multiple: int = 1
) -> dict:
    """Label-aligned tensors of a whole rollout batch.

    Args:
        rollouts: b sequences of width L.
        pad_id: id written into labels past each sequence (masked anyway).
        seq_len: pad (or keep) to this many positions; None: L.
        multiple: then round the positions up to a multiple of this (sequence parallelism needs
            a multiple of tp: ``models.sequence_parallel.sequence_multiple``). The added
            positions hold pad tokens and are masked out of the loss.
    Returns:
        dict of "tokens", "labels", "position_ids" ([b, S] int64), "loss_mask" ([b, S] bool),
        "old_logprobs" ([b, S] fp32).
    """
    tokens = rollouts.tokens
    b, width = tokens.shape
    s = seq_len or width
    if s < width:
        raise ValueError(f"seq_len={s} is shorter than the rollouts ({width} tokens)")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    s = -(-s // multiple) * multiple
    padded = torch.full((b, s + 1), pad_id, dtype=torch.long)
    padded[:, :width] = tokens
    mask = torch.zeros(b, s + 1, dtype=torch.bool)
    mask[:, :width] = rollouts.response_mask()
    logprobs = torch.zeros(b, s + 1)
    logprobs[:, :width] = rollouts.logprobs
    return {
        "tokens": padded[:, :s].contiguous(),
        "labels": padded[:, 1:].contiguous(),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        "loss_mask": mask[:, 1:].contiguous(),
        "old_logprobs": logprobs[:, 1:].contiguous(),
    }


def largest_divisor(n: int, at_most: int) -> int:
    """The largest micro-batch size <= ``at_most`` that splits ``n`` rows evenly (>= 1)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def split_micro_batches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Consecutive row slices of ``micro_batch_size`` (the row count must divide evenly)."""
    b = next(iter(batch.values())).shape[0]
    if b % micro_batch_size != 0:
        raise ValueError(f"{b} sequences do not split into micro-batches of {micro_batch_size}")
    return [
        {k: v[i : i + micro_batch_size] for k, v in batch.items()}
        for i in range(0, b, micro_batch_size)
    ]


def step_micro_batches(
    rollouts: RolloutBatch,
    pad_id: int,
    micro_batch_size: int,
    *,
    groups: int = 1,
    multiple: int = 1,
    max_tokens: int | None = None,
) -> list[list[dict]]:
    """Each optimizer step's micro-batches, each padded only to its own longest sequence.

    The rows split into ``groups`` consecutive equal groups (one per optimizer step); within a
    group they are ordered by length, longest first (ties keep their order), and cut into
    micro-batches, so rows of similar length share one. Each micro-batch is :func:`collate`'s
    tensors for its rows, cut to width s_m = its longest sequence (prompt + response), rounded up
    to ``multiple``: responses from tens to thousands of tokens no longer all cost the longest
    one's compute in the teacher pass and the update.

    Row counts: without ``max_tokens``, ``micro_batch_size`` rows each (it must divide the rows
    of a group). With ``max_tokens`` (a token budget, ``rollout.micro_batch_tokens``), each
    micro-batch takes, longest first, as many rows as keep b_m x s_m <= ``max_tokens`` and
    b_m <= ``micro_batch_size``: short rows share large micro-batches, long ones small ones, so
    every micro-batch costs about the same memory (a row longer than the budget gets one of its
    own). The count per group then varies with the lengths.

    Every per-token field is label-aligned and the cut keeps every response position (a sequence
    of n tokens has its last loss position at n - 2), so the per-token losses and their token sum
    are those of the padded batch; only the grouping of rows into micro-batches changes, which
    megatron's token-sum loss does not see.

    Returns one list per group of dicts of [b_m, s_m] tensors as in :func:`collate`. No
    communication: every rank of a replica, given the same rollouts, builds the same micro-batches.
    """
    rows = len(rollouts)
    if groups < 1 or rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} equal groups")
    per_group = rows // groups
    if micro_batch_size < 1 or (max_tokens is None and per_group % micro_batch_size):
        raise ValueError(f"{per_group} rows per group do not split into micro-batches of "
                         f"{micro_batch_size}")  # fmt: skip
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batch = collate(rollouts, pad_id, multiple=multiple)
    full = batch["tokens"].shape[1]
    lengths = rollouts.prompt_lens + rollouts.response_lens
    widths = torch.clamp(-(-lengths.clamp(min=1) // multiple) * multiple, max=full).tolist()
    grouped = []
    for g in range(groups):
        lo = g * per_group
        order = lo + torch.sort(lengths[lo : lo + per_group], descending=True, stable=True)[1]
        order = order.tolist()
        micro, i = [], 0
        while i < per_group:
            width = widths[order[i]]  # the longest row left in the group
            n = micro_batch_size
            if max_tokens is not None:
                n = max(1, min(n, max_tokens // width))
            idx = torch.tensor(order[i : i + n], dtype=torch.long)
            micro.append({k: v[idx, :width].contiguous() for k, v in batch.items()})
            i += n
        grouped.append(micro)
    return grouped


def attach_teacher(micro_batches: Sequence[dict], payloads: Sequence[TeacherPayload]) -> None:
    """Store each micro-batch's teacher payload under "teacher", transposed from the scoring
    pass's [s, b] (and [s, b, k]) layout to the logits' [b, s] layout the loss reads."""
    if len(micro_batches) != len(payloads):
        raise ValueError(f"{len(micro_batches)} micro-batches but {len(payloads)} payloads")
    for mb, p in zip(micro_batches, payloads):
        if p is not None:
            p = TeacherPayload(*(f.transpose(0, 1).contiguous() for f in p))
        mb["teacher"] = p


def sft_micro_batches(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    micro_batch_size: int,
    multiple: int = 1,
) -> tuple[list[dict], int]:
    """Supervised micro-batches from (token ids, loss mask) examples; returns (batches, S).

    Each micro-batch holds "tokens", "labels", "position_ids" [b, S] and "loss_mask" [b, S]
    (label-aligned: True where the label is a solution or EOS token). S is the longest example,
    rounded up to a multiple of ``multiple`` (padding masked out).
    """
    s = max(len(ids) for ids, _ in examples)
    s = -(-s // multiple) * multiple
    b = len(examples)
    padded = torch.full((b, s + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s + 1, dtype=torch.bool)
    for i, (ids, m) in enumerate(examples):
        padded[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[i, : len(m)] = torch.as_tensor(list(m), dtype=torch.bool)
    batch = {
        "tokens": padded[:, :s].contiguous(),
        "labels": padded[:, 1:].contiguous(),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        "loss_mask": mask[:, 1:].contiguous(),
    }
    return split_micro_batches(batch, micro_batch_size), s
