"""The trainable student: megatron DDP wrapping, AdamW with a warmup + cosine schedule, one update.

`setup_student(chunks, OptimConfig(...))` wraps the chunks in megatron-core's
DistributedDataParallel, builds megatron's optimizer (AdamW; fused TE/apex kernels when present,
torch.optim.AdamW otherwise) and its OptimizerParamScheduler, and wires megatron's grad hooks
(`no_sync_func`, `finalize_model_grads_func`) into the model config so that `forward_backward_func`
all-reduces gradients over data parallelism and the tied-embedding group.

`train_step(...)` runs megatron's pipeline schedule with the given forward step, then steps the
optimizer unless the loss or the gradient norm is not finite (the update is skipped and counted).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule of the student update."""

    lr: float = 1e-6
    """Peak learning rate (after warmup)."""

    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""

    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay; megatron skips it on biases and norms."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""

    total_steps: int = 1000
    """Steps of warmup + cosine decay; after that lr stays at min_lr."""


@dataclass
class Student:
    """A student ready to train: DDP-wrapped chunks, optimizer, scheduler and skip counters.

    ``skipped_in_a_row`` counts the non-finite updates skipped since the last applied one;
    ``max_skipped_in_a_row`` (0: no limit) is where ``trainer.update.optimizer_step`` stops
    the run instead of skipping once more (a diverged model skips every later update)."""

    chunks: list
    optimizer: object
    scheduler: object
    skipped_updates: int = 0
    skipped_in_a_row: int = 0
    max_skipped_in_a_row: int = 0


def setup_student(chunks, optim: OptimConfig, ddp_config=None) -> Student:
    """Wrap `chunks` in megatron DDP and build optimizer + scheduler.

    Collectives: megatron DDP broadcasts parameters from data-parallel rank 0 at wrap time.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = chunks[0].config
    ddp_config = ddp_config or DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0)
        )
        for i, chunk in enumerate(chunks)
    ]
    for model in wrapped:
        model.broadcast_params()
    config.no_sync_func = [m.no_sync for m in wrapped]
    if len(wrapped) == 1:
        config.no_sync_func = config.no_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(optim.total_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(optim.total_steps, 1),
        wd_incr_style="constant",
    )
    return Student(chunks=wrapped, optimizer=optimizer, scheduler=scheduler)


def shapes_differ(batches, seq_length: int | None = None, micro_batch_size: int | None = None
                  ) -> bool:  # fmt: skip
    """True when the micro-batches (dicts with "tokens" [b, s]) are not all of one shape, or
    (``seq_length`` / ``micro_batch_size`` given) not all of width ``seq_length`` / of
    ``micro_batch_size`` rows: under pipeline parallelism a stage that receives allocates
    [seq_length, micro_batch_size, h] unless megatron's schedule sends the shape."""
    shapes = {tuple(int(d) for d in b["tokens"].shape[-2:]) for b in batches}
    if len(shapes) > 1:
        return True
    if not shapes:
        return False
    rows, width = next(iter(shapes))
    return (seq_length is not None and width != seq_length) or (
        micro_batch_size is not None and rows != micro_batch_size
    )


@contextlib.contextmanager
def variable_shapes(chunks, batches=None, seq_length=None, micro_batch_size=None):
    """While in the block, megatron's pipeline schedule sends each micro-batch's activation shape
    before the activations (``config.variable_seq_lengths``) when the model is pipelined and
    ``batches`` is None (always) or its shapes are not all [micro_batch_size, seq_length]
    (:func:`shapes_differ`); otherwise nothing changes (a receiving stage allocates
    [seq_length, micro_batch_size, h]). The setting is restored on exit. Collectives: none
    here; in the schedule, one extra p2p of 3 int64 before each activation and gradient
    transfer."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])
    before = config.variable_seq_lengths
    vary = batches is None or shapes_differ(batches, seq_length, micro_batch_size)
    if vary and ps.get_pipeline_model_parallel_world_size() > 1:
        config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = before


def run_forward_backward(
    chunks,
    forward_step_func,
    data_iterator,
    num_microbatches,
    seq_length,
    micro_batch_size,
    forward_only=False,
    micro_batches=None,
):
    """megatron's forward_backward_func for the current PP/VPP; returns the last stage's outputs.

    `data_iterator` is one iterator, or a list with one per model chunk under VPP. Pass the
    `micro_batches` behind it when their shapes may differ: when any is not [micro_batch_size,
    seq_length], the pipeline schedule exchanges each one's shape (:func:`variable_shapes`).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    shapes = (contextlib.nullcontext() if micro_batches is None else
              variable_shapes(chunks, micro_batches, seq_length, micro_batch_size))  # fmt: skip
    with shapes:
        return forward_backward(
            forward_step_func=forward_step_func,
            data_iterator=data_iterator,
            model=chunks,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def reduce_loss_metric(outputs, key: str = "loss") -> torch.Tensor:
    """The global-batch value of a loss metric, on every rank.

    `outputs` is what forward_backward_func returned (a dict per micro-batch on the last stage,
    nothing elsewhere). A metric given as a 2-vector [sum, count] (the per-token convention, with
    `calculate_per_token_loss=True`) gives sum(sums) / sum(counts) over all micro-batches of all
    data-parallel replicas; a scalar gives the mean over micro-batches and replicas. Collectives:
    one all-reduce of 2 floats over the DP group, one over the pipeline group (other stages
    contribute zeros).
    """
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import compute_device

    total = torch.zeros(2, device=compute_device())  # [numerator, denominator]
    if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
        for out in outputs:
            value = out[key].detach().float().reshape(-1)
            if value.numel() == 2:
                total += value.to(total.device)
            else:
                total += torch.stack([value.sum(), torch.ones_like(value.sum())]).to(total.device)
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return total[0] / total[1]


@torch.no_grad()
def guarded_optimizer_step(optimizer) -> tuple[bool, float]:
    """Step megatron's optimizer only if the gradient norm is finite; return (stepped, grad_norm).

    Same sequence as megatron's MixedPrecisionOptimizer/FP32Optimizer.step (copy grads, unscale,
    global-norm clip, step) but the norm is checked before anything changes the weights, so a
    NaN/inf gradient leaves the model and the optimizer state untouched. Collectives: the
    grad-norm all-reduce over the model-parallel group.
    Tested with megatron's plain optimizer (CPU, TP/PP/DP) and its DistributedOptimizer (one GPU,
    dp = 1: same steps as the plain one; it refuses CPU tensors). Precision-aware (decoupled-grad)
    optimizers are not supported.
    """
    if optimizer.prepare_grads():  # inf/nan found by the fp16 grad scaler
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        # Clip by the global norm ourselves: megatron's clip_grad_by_total_norm_fp32 asserts CUDA
        # tensors. Same rule: scale by clip / (norm + 1e-6) when that is below 1.
        coeff = sub.config.clip_grad / (grad_norm + 1.0e-6) if sub.config.clip_grad > 0 else 1.0
        grads = [p.grad for p in sub.get_parameters() if p.grad is not None]
        if coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(
    student: Student,
    forward_step_func,
    data_iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    loss_key: str = "loss",
) -> dict:
    """One update: zero grads, forward/backward over all micro-batches, optimizer + scheduler step.

    The update is skipped (and `student.skipped_updates` incremented) when the loss (the global
    value of `loss_key`, see reduce_loss_metric) or the gradient norm is not finite. For a loss
    normalised by the valid tokens of the global batch, build the model with
    `calculate_per_token_loss=True` and return (loss_sum, num_tokens, {key: [sum, count]}) from
    the loss function: megatron divides the gradients by the global token count.
    Returns {"loss", "grad_norm", "lr", "skipped"} on every rank. Collectives: those of the schedule
    (p2p, TP), the DDP gradient all-reduce, the optimizer's grad-norm all-reduce, the two small
    all-reduces of reduce_loss_metric.
    """
    for model in student.chunks:
        model.zero_grad_buffer()
    student.optimizer.zero_grad()
    outputs = run_forward_backward(
        student.chunks,
        forward_step_func,
        data_iterator,
        num_microbatches,
        seq_length,
        micro_batch_size,
    )
    loss = float(reduce_loss_metric(outputs, loss_key))
    skipped = not math.isfinite(loss)
    grad_norm = float("nan")
    if not skipped:
        ok, grad_norm = guarded_optimizer_step(student.optimizer)
        skipped = not ok
    if skipped:
        student.skipped_updates += 1
        logger.warning(
            "skipped update: loss=%s grad_norm=%s (skipped so far: %d)",
            loss,
            grad_norm,
            student.skipped_updates,
        )
    else:
        student.scheduler.step(increment=1)
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": student.optimizer.param_groups[0]["lr"],
        "skipped": skipped,
    }
