"""Peak memory of a phase of the iteration (the ``memory_rollout_gib`` / ``memory_update_gib``
metrics): what a user tunes ``rollout.max_decode_batch`` and ``rollout.micro_batch_size`` by.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (tensors; the caching allocator's reserve
comes on top), reset by ``torch.cuda.reset_peak_memory_stats``. On the CPU it is the process's
peak resident set size (``VmHWM`` in ``/proc/self/status``: weights, activations and the Python
process itself), reset by writing 5 to ``/proc/self/clear_refs`` (Linux); where that file is
missing or not writable the peak counts from the process's start (one warning says so), and where
``/proc`` is missing the value is NaN.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

__all__ = ["max_over_ranks", "peak_gib", "reset_peak"]

logger = logging.getLogger(__name__)
_WARNED = []


def _on_cuda() -> bool:
    from megatron_eaopd.parallel.init import compute_device

    return compute_device().type == "cuda"


def reset_peak() -> None:
    """Start a new peak on this rank (no communication)."""
    if _on_cuda():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        if not _WARNED:
            _WARNED.append(True)
            logger.warning("cannot reset the peak resident memory (/proc/self/clear_refs: %s): "
                           "memory_rollout_gib and memory_update_gib are the peak since the "
                           "process started", exc)  # fmt: skip


def peak_gib() -> float:
    """This rank's peak since :func:`reset_peak`, in GiB (NaN where it cannot be read)."""
    if _on_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum over every rank of the world: 1 all-reduce (MAX) of len(values)
    float64 (none in a world of 1). NaN on any rank gives NaN."""
    from megatron_eaopd.parallel.init import compute_device

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    nan = torch.isnan(t).to(torch.float64)
    both = torch.stack([torch.nan_to_num(t, nan=0.0), nan])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return [math.nan if n else v for v, n in zip(both[0].tolist(), both[1].tolist())]
