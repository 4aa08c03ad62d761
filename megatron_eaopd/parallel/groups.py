"""Tensor-parallel group resolution and the one collective the vocab-parallel losses use.

`tp_group=None` means: megatron-core's tensor-model-parallel group when megatron's parallel state
is initialised, else a single rank (no communication at all). Passing a group explicitly always
wins, so the same code runs inside a Megatron job, in a bare torch.distributed job and in a
single-process notebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_tp_group(tp_group=None):
    """Return the TP process group to use, or None for a single rank.

    Falls back to megatron-core's tensor-model-parallel group when it is initialised. megatron is
    imported lazily so the loss code has no import-time dependency on it.
    """
    if tp_group is not None:
        return tp_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover - megatron-core is a declared dependency
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def tp_rank_and_size(tp_group) -> tuple[int, int]:
    """(rank, world size) of this process inside `tp_group`; (0, 1) for None."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def all_gather_rows(local: torch.Tensor, tp_group) -> torch.Tensor:
    """Gather a small per-token tensor from every TP rank: [n, c] -> [tp, n, c].

    One collective (all_gather_single, called all_gather_into_tensor before torch 2.13) when the
    group has more than one rank, none otherwise. The result is ordered by rank in the group.
    """
    rank, size = tp_rank_and_size(tp_group)
    if size == 1:
        return local.unsqueeze(0)
    local = local.contiguous()
    out = torch.empty((size * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype,
                      device=local.device)  # fmt: skip
    _all_gather_single(out, local, group=tp_group)
    return out.view((size,) + tuple(local.shape))


def _all_gather_single(out, local, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def any_rank(flag: bool, group, device=None) -> bool:
    """Whether ``flag`` is True on any rank of ``group``: 1 all-reduce (MAX) of one element when
    the group has more than one rank, none otherwise. Every rank gets the same answer, so ranks
    that must take the same path (or pair the same collectives) can agree on it. ``device``:
    where the flag travels (None: ``parallel.init.compute_device()``, the current GPU under
    NCCL)."""
    if group is None or dist.get_world_size(group) == 1:
        return bool(flag)
    if device is None:
        from megatron_eaopd.parallel.init import compute_device

        device = compute_device()
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def all_reduce_sum(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """In-place SUM all-reduce over the TP group (one collective; none for a single rank)."""
    if tp_rank_and_size(tp_group)[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=tp_group)
    return tensor
