"""Interleaved decoding under pipeline parallelism: one chunk's rows as PP groups whose decode
steps overlap over the stages.

A decode step of one batch under PP runs stage after stage (stage s + 1 needs stage s's hidden
states; stage 0 needs the last stage's draw before the next step), so every stage but one is
idle at any time. With the rows split into groups, stage s can run one group's forward while
stage s + 1 runs another's, as a training pipeline overlaps micro-batches. The tokens are those
of one batch: the draws follow (position, the row's index in the call), not the batch.

Schedule (``run_interleaved``), the same rule on every rank:

- the first step of each group (prefill and FastDecoder's check against megatron's forward)
  runs group after group, as in the one-batch path;
- then stage s keeps up to ``pp - s`` forwards ahead of their draws: forwards take the live
  groups in round-robin order; draws (each with its broadcast over the pipeline group) follow
  the order of the forwards; a group's next forward comes only after its draw. Hidden states go
  to the next stage by ``isend``, so a stage never waits for its successor to receive.

Every rank therefore makes the same sequence of broadcasts, each stage receives its hidden
states in the order its predecessor sent them, and a group that finishes leaves the rotation on
every rank at the same draw. Why this cannot deadlock: number the forwards 0, 1, 2, ... in
round-robin order (the same numbering on every stage) and the draws likewise. Stage s runs
forward i right after draw i - a_s, a_s = min(PP - s, live groups). a_s does not grow with s,
so when stage s needs forward i's hidden states, stage s - 1 has already been free to run it
(its draw i - a_{s-1} <= i - a_s came earlier in the common draw order); a send never waits
for its receiver (isend, waited at the group's next forward, after the receiver has taken it);
and a group's next forward follows its draw on every stage, so no forward waits on a draw
that waits on it. Under NCCL the sends (world group) and the draws' broadcasts (pipeline group)
use different communicators in rank-dependent order, which NCCL warns may deadlock; small sends
normally complete without the receiver, but this was run on gloo only.

With PP 2 and two groups: stage 0 runs F0 F1 D0 F0 D1 F1 ..., stage 1 runs F0 D0 F1 D1 F0 ...
(F: forward, D: draw), each stage's forward of one group alongside the other stage's work on
the other group.
"""

from __future__ import annotations

import collections

__all__ = ["run_interleaved", "split_rows"]


def split_rows(rows: int, groups: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of at most ``groups`` contiguous, non-empty groups of ``rows`` rows whose
    sizes differ by at most one."""
    bounds = [rows * g // groups for g in range(groups + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def run_interleaved(decoders: list, counters: dict) -> list:
    """Decode the groups of one chunk with the schedule of the module docstring.

    Args:
        decoders: the groups' ``generate._Decoder`` (``forward``, ``finish``, ``alive``,
            ``fast``, ``result``), built on every rank in the same order, whose FastDecoders
            share their weight copies.
        counters: ``generate``'s counters: "interleaved" counts the chunk when two or more of
            its groups interleaved; "fast" counts the chunk once if every group decoded with
            FastDecoder.
    Returns:
        The groups' RolloutBatches, in the order of ``decoders``.
    Collectives: those of the groups' steps (``generate``), hidden states by isend instead of
    send between the first steps and the end. If a group falls back to megatron's forward at
    its first step (the check, agreed by every stage), the groups run one after another.
    """
    from megatron.core import parallel_state as ps

    fast_before = counters["fast"]
    for d in decoders:
        d.forward()
        d.finish()
    live = [d for d in decoders if d.alive]
    try:
        if any(d.fast is None for d in decoders):
            for d in live:
                while d.alive:
                    d.forward()
                    d.finish()
        else:
            counters["interleaved"] += len(live) > 1
            for d in live:
                d.fast.async_send = True
            stage = ps.get_pipeline_model_parallel_rank()
            ahead = ps.get_pipeline_model_parallel_world_size() - stage
            queue, pending = collections.deque(live), collections.deque()
            while queue or pending:
                while queue and len(pending) < ahead:
                    d = queue.popleft()
                    d.forward()
                    pending.append(d)
                d = pending.popleft()
                if d.finish():
                    queue.append(d)
    finally:
        for d in decoders:
            if d.fast is not None:
                d.fast.wait_sent()
                d.fast.async_send = False
    counters["fast"] = fast_before + (counters["fast"] - fast_before == len(decoders))
    return [d.result() for d in decoders]
