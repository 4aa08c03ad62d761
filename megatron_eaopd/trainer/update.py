"""One optimizer step through megatron's forward_backward_func, and the forward steps it runs.

Both the distillation update (the EOPD loss of :mod:`megatron_eaopd.losses`) and the supervised
teacher preparation (token cross-entropy) return megatron's 3-tuple from their ``loss_func``: the
masked SUM of per-token losses, the number of valid tokens, and ``reported`` (metric name ->
[numerator, denominator]). With ``calculate_per_token_loss=True`` in the model config, megatron's
``finalize_model_grads`` divides the gradients by the valid tokens of the global batch (the paper's
token mean), and :func:`reduce_outputs` turns the reported pairs into exact means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_eaopd.losses import DistillMicroBatch, ObjectiveConfig, make_loss_func
from megatron_eaopd.losses.output_layer import hidden_states_output, is_last_stage
from megatron_eaopd.models.student import (
    guarded_optimizer_step,
    run_forward_backward,
)
from megatron_eaopd.trainer.batches import on_device

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteUpdateError",
    "distill_forward_step",
    "distill_on_rollouts",
    "idle_rollouts",
    "replica_prompts",
    "optimizer_step",
    "reduce_outputs",
    "sft_forward_step",
]


class NonFiniteUpdateError(RuntimeError):
    """A non-finite loss or gradient norm with ``training.skip_nonfinite: false``, or more
    updates skipped in a row than ``training.max_skipped_in_a_row`` allows. Every rank raises
    it at the same step (the loss and the gradient norm are global); ``eaopd-train`` prints the
    message and exits 1."""


def distill_forward_step(objective: ObjectiveConfig, vocab_size: int):
    """megatron forward_step_func for the distillation loss.

    Each micro-batch is a dict with "tokens", "position_ids", "labels", "loss_mask",
    "old_logprobs" ([b, s]) and "teacher" (TeacherPayload with [b, s] / [b, s, k] fields; in the
    exact form the teacher's [b, s, V_pad / tp] logits shard, or with ``objective.use_fused`` the
    pair (teacher hidden states [b, s, h_t], teacher output weight [V_pad / tp, h_t])).

    Unfused: the model returns [b, s, V_pad / tp] logits and loss_func is ``make_loss_func``'s.
    Fused (``objective.use_fused``, loss.fused_output): on the last pipeline stage the model runs
    with its output layer swapped for an identity (``losses.output_layer.hidden_states_output``)
    and returns the final hidden states [b, s, h]; loss_func gets them with the output weight
    shard [V_pad / tp, h] (the shared embedding weight when tied) and computes the loss chunk by
    chunk (``objective.fused_chunk_size`` tokens), so no [b, s, V_pad / tp] tensor exists. The
    hidden-state gradient is all-reduced over TP inside the fused loss (the output layer's
    ``copy_to_tensor_model_parallel_region`` is skipped with it); the weight gets its shard's
    gradient, accumulated by DDP like any parameter's. Other pipeline stages are unchanged.
    """

    def forward_step(data_iterator, model):
        mb = on_device(next(data_iterator))
        batch = DistillMicroBatch(mb["labels"], mb["loss_mask"], mb["teacher"], mb["old_logprobs"])
        if objective.use_fused and is_last_stage(model):
            with hidden_states_output(model) as weight:
                output = model(mb["tokens"], mb["position_ids"], None)
            loss_func = make_loss_func(objective, batch, vocab_size=vocab_size,
                                       output_weight=weight)  # fmt: skip
            return output, loss_func
        output = model(mb["tokens"], mb["position_ids"], None)
        return output, make_loss_func(objective, batch, vocab_size=vocab_size)

    return forward_step


def sft_forward_step(vocab_size: int):
    """megatron forward_step_func for supervised next-token training (teacher preparation).

    Micro-batches hold "tokens", "position_ids", "labels", "loss_mask" [b, s]. loss_func returns
    (sum of -log p(label) over masked tokens, token count, {"loss": [sum, count]}).
    Collectives: one TP all-gather of [b*s, 5] per micro-batch (the vocab-parallel log-prob).
    """
    from megatron_eaopd.losses import vocab_parallel_token_logprobs

    def forward_step(data_iterator, model):
        mb = on_device(next(data_iterator))
        output = model(mb["tokens"], mb["position_ids"], None)

        def loss_func(logits):  # [b, s, V_pad / tp]
            nll = -vocab_parallel_token_logprobs(logits, mb["labels"], vocab_size=vocab_size)
            mask = mb["loss_mask"]
            total = torch.where(mask, nll, 0.0).sum()
            n = mask.sum()
            return total, n.to(torch.int), {"loss": torch.stack([total.detach(), n.float()])}

        return output, loss_func

    return forward_step


def reduce_outputs(outputs: Sequence[dict], names: Sequence[str] | None = None) -> dict[str, float]:
    """Exact means of the reported [numerator, denominator] pairs over micro-batches and ranks.

    Only the last pipeline stage has outputs; the sums travel in one all-reduce over the
    data-parallel group and one over the pipeline group. The other stages do not know the
    metric names: pass ``names``, or under PP they are broadcast from the last stage (one object
    broadcast over the pipeline group). Returns {name: numerator / denominator} (0 when empty).
    """
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import compute_device

    if names is None:
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [sorted(outputs[0]) if outputs else None]
            dist.broadcast_object_list(
                box,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
            names = box[0]
        if names is None:
            if not outputs:
                raise ValueError("no outputs on this rank: pass the metric names")
            names = sorted(outputs[0])
    names = list(names)
    sums = torch.zeros(len(names), 2, dtype=torch.float64, device=compute_device())
    for out in outputs:
        sums += torch.stack([out[k].double().reshape(2) for k in names])
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    return {k: (n / d if d > 0 else 0.0) for k, (n, d) in zip(names, sums.tolist())}


def sum_outputs(outputs: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Sum the reported pairs over micro-batches (to merge several steps before reducing)."""
    total: dict[str, torch.Tensor] = {}
    for out in outputs:
        for k, v in out.items():
            total[k] = total.get(k, 0) + v.double().reshape(2)
    return total


def optimizer_step(
    student,
    forward_step,
    micro_batches: Sequence[dict],
    seq_length: int,
    micro_batch_size: int,
    *,
    skip_nonfinite: bool = True,
    metric_names: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Zero grads, forward/backward over the micro-batches, then step unless non-finite.

    Args:
        student: a ``models.student.Student`` (DDP chunks, optimizer, scheduler, skip counter).
        forward_step: a megatron forward_step_func whose loss_func reports "loss".
        micro_batches: the step's micro-batches (this data-parallel rank's share); they may differ
            in width and rows, and from ``seq_length`` and ``micro_batch_size`` (then the
            schedule sends shapes: :func:`run_forward_backward`).
    Returns:
        (metrics on every rank: the reported means plus "grad_norm", "lr" (the learning rate
         this step applied, or would have applied when skipped), "skipped";
         the raw reported outputs of this rank, for merging over steps).
    Raises:
        NonFiniteUpdateError: non-finite loss or gradient norm and ``skip_nonfinite`` is False,
            or the ``student.max_skipped_in_a_row``-th skipped update in a row.
    Collectives: those of the schedule and DDP, the grad-norm all-reduce, and the metric
    all-reduces of :func:`reduce_outputs`.
    """
    for model in student.chunks:
        model.zero_grad_buffer()
    student.optimizer.zero_grad()
    outputs = run_forward_backward(
        student.chunks,
        forward_step,
        iter(micro_batches),
        len(micro_batches),
        seq_length,
        micro_batch_size,
        micro_batches=micro_batches,
    )
    outputs = list(outputs or [])
    metrics = reduce_outputs(outputs, metric_names)
    loss = metrics.get("loss", float("nan"))
    grad_norm, stepped = float("nan"), False
    lr = float(student.optimizer.param_groups[0]["lr"])  # this step's (the scheduler moves on)
    if math.isfinite(loss):
        stepped, grad_norm = guarded_optimizer_step(student.optimizer)
    if stepped:
        student.scheduler.step(increment=1)
        student.skipped_in_a_row = 0
    else:
        if not skip_nonfinite:
            raise NonFiniteUpdateError(
                f"non-finite update: loss={loss} grad_norm={grad_norm} (training.skip_nonfinite"
                "=false stops here; the latest checkpoint holds the model before this step)"
            )
        student.skipped_updates += 1
        student.skipped_in_a_row += 1
        limit = student.max_skipped_in_a_row
        if limit and student.skipped_in_a_row >= limit:
            raise NonFiniteUpdateError(
                f"the last {student.skipped_in_a_row} updates were all skipped (non-finite: "
                f"loss={loss}, grad_norm={grad_norm}): the model has diverged (or its inputs "
                "are not finite), and every later update would be skipped too. The learning "
                "rate is part of the run's settings: start a new run (a new "
                "training.output_dir) with a lower optimizer.lr or optimizer.clip_grad > 0. To "
                "start it from a save made before the divergence, copy the checkpoint folder, "
                "write that save's name into the copy's `latest` and pass the copy as "
                "model.student_checkpoint. training.max_skipped_in_a_row=0 never stops"
            )
        logger.warning(
            "skipped a non-finite update (loss=%s, grad_norm=%s; %d skipped so far)",
            loss,
            grad_norm,
            student.skipped_updates,
        )
    metrics.update(
        grad_norm=grad_norm,
        lr=lr,
        skipped=float(not stepped),
    )
    return metrics, outputs


def distill_on_rollouts(
    student,
    teacher,
    objective: ObjectiveConfig,
    rollouts,
    *,
    steps: int,
    micro_batch_size: int,
    pad_id: int,
    vocab_size: int,
    top_k: int,
    temperature: float,
    chunk_size: int | None = None,
    skip_nonfinite: bool = True,
    progress=None,
    trim: bool = True,
    micro_batch_tokens: int | None = None,
) -> dict:
    """Teacher pass and ``steps`` optimizer steps on this data-parallel replica's rollouts.

    Call on every rank, under any layout, with the rollouts of this rank's student replica:
    rows of whole prompts (all samples of a prompt together), the same on every rank of the
    replica, a multiple of ``steps`` rows. Step j uses the j-th consecutive slice of the rows;
    the trainer deals the prompts of global mini-batch j round-robin over the replicas
    (:func:`replica_prompts`), so step j of all replicas together covers mini-batch j whatever
    the layout, and with megatron's per-token loss (the gradient is divided by the valid tokens
    of the whole mini-batch) the update does not depend on the layout. Replicas may hold
    different numbers of rows; a replica with none (``rollouts`` None or empty: fewer prompts
    per mini-batch than replicas) takes part with one fully masked row per step
    (:func:`idle_rollouts`), so every rank makes the same collectives and adds nothing.
    Micro-batches hold the largest divisor of the rows per step that is at most
    ``micro_batch_size`` rows; with ``trim`` (the default) a step's rows are ordered by length
    and each micro-batch is padded only to its own longest sequence
    (:func:`trainer.batches.step_micro_batches`), else every one to the replica's longest.
    With ``micro_batch_tokens`` (rollout.micro_batch_tokens; needs ``trim``) a micro-batch holds
    at most that many padded positions (rows x its width) and at most ``micro_batch_size`` rows,
    no divisor needed: the count per step then differs between steps and replicas. Every way
    gives the same update up to float rounding (megatron sums per-token losses).

    The sampled form scores with :func:`trainer.scoring.score_with_teacher` (teacher at its own
    layout); ``objective.form == "exact"`` attaches the teacher's logits shard instead, or with
    ``objective.use_fused`` its hidden states and output weight. With ``objective.use_fused``
    (loss.fused_output) the teacher payload and the student loss are computed from hidden states
    chunk by chunk (``objective.fused_chunk_size``), never as [b, s, V_pad / tp] logits;
    ``chunk_size`` (loss.chunk_size) sizes the unfused kernels' chunks.
    Returns {"micro": the micro-batches, "outputs": the reported loss pairs of this rank,
    "grad_norms": per step, "last": the last step's metrics, "time_teacher", "time_update"}.
    Collectives: the teacher exchange, then per step those of :func:`optimizer_step`.
    """
    import time

    from megatron_eaopd.models.sequence_parallel import sequence_multiple
    from megatron_eaopd.parallel.init import use_layout
    from megatron_eaopd.trainer.batches import (
        collate,
        largest_divisor,
        split_micro_batches,
        step_micro_batches,
    )
    from megatron_eaopd.trainer.build import STUDENT
    from megatron_eaopd.trainer.scoring import attach_teacher_logits, score_with_teacher

    t0 = time.perf_counter()
    if rollouts is None or len(rollouts) == 0:
        rollouts = idle_rollouts(steps, pad_id)
    rows = len(rollouts)
    if steps < 1 or rows % steps:
        raise ValueError(f"{rows} rollout rows do not split into {steps} optimizer steps")
    rows_per_step = rows // steps
    multiple = sequence_multiple(student.chunks)
    if micro_batch_tokens is not None:
        if not trim:
            raise ValueError("micro_batch_tokens needs trim=True (micro-batches cut by length)")
        grouped = step_micro_batches(rollouts, pad_id, micro_batch_size, groups=steps,
                                     multiple=multiple, max_tokens=micro_batch_tokens)  # fmt: skip
    else:
        mbs = largest_divisor(rows_per_step, micro_batch_size)
        if trim:
            grouped = step_micro_batches(rollouts, pad_id, mbs, groups=steps, multiple=multiple)
        else:
            flat = split_micro_batches(collate(rollouts, pad_id, multiple=multiple), mbs)
            per_step = rows_per_step // mbs
            grouped = [flat[j * per_step : (j + 1) * per_step] for j in range(steps)]
    micro = [mb for group in grouped for mb in group]
    fused = objective.use_fused
    if objective.form == "exact":
        attach_teacher_logits(teacher, micro, fused=fused)
    else:
        score_with_teacher(
            teacher, micro, k=top_k, vocab_size=vocab_size, temp=temperature, chunk_size=chunk_size,
            fused=fused, fused_chunk_size=objective.fused_chunk_size,
        )  # fmt: skip
    t1 = time.perf_counter()
    forward_step = distill_forward_step(objective, vocab_size)
    outputs, grad_norms, last = [], [], {}
    with use_layout(STUDENT):
        for mine in grouped:
            widest = max(mb["tokens"].shape[1] for mb in mine)  # this step's own
            most = max(mb["tokens"].shape[0] for mb in mine)
            last, outs = optimizer_step(
                student, forward_step, mine, widest, most, skip_nonfinite=skip_nonfinite,
            )  # fmt: skip
            outputs += outs
            grad_norms.append(last["grad_norm"])
            if progress is not None:
                progress(1)
    return {
        "micro": micro,
        "outputs": outputs,
        "grad_norms": grad_norms,
        "last": last,
        "time_teacher": t1 - t0,
        "time_update": time.perf_counter() - t1,
    }


def replica_prompts(indices, mini_batch_size: int, dp: int, dp_rank: int) -> list:
    """This replica's share of an iteration's prompt indices: mini-batch j is
    ``indices[j * m : (j + 1) * m]``, dealt round-robin (its p-th prompt to replica p mod dp);
    the shares of the mini-batches are concatenated in order. Replicas differ by at most one
    prompt per mini-batch and get none when m < dp and dp_rank >= m."""
    m = mini_batch_size
    return [p for j in range(0, len(indices), m) for p in list(indices[j : j + m])[dp_rank::dp]]


def idle_rollouts(rows: int, pad_id: int):
    """``rows`` placeholder sequences with no response token (two pad tokens each, every loss
    position masked): the share of a data-parallel replica that has no prompts."""
    from megatron_eaopd.rollout import RolloutBatch

    return RolloutBatch(
        tokens=torch.full((rows, 2), pad_id, dtype=torch.long),
        prompt_lens=torch.ones(rows, dtype=torch.long),
        response_lens=torch.zeros(rows, dtype=torch.long),
        logprobs=torch.zeros(rows, 2),
        entropies=torch.zeros(rows, 2),
        finished=torch.zeros(rows, dtype=torch.bool),
    )
