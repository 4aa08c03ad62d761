"""Point-to-point exchange of tensors between the ranks of two layouts on the same world.

The student and the teacher run under different TP x PP layouts on the same processes (see
:func:`megatron_eaopd.parallel.init.initialize_layouts`), so a student data-parallel replica and the
teacher replica that scores its sequences are different sets of ranks. :func:`layout_table` tells
every rank where every rank sits in each layout, and :func:`exchange` moves tensors between named
ranks with matched sends and receives: each tensor travels only to the ranks that need it, so the
bytes a rank receives are set by its own share of the batch, not by the world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["TRAFFIC", "LayoutTable", "exchange", "layout_table", "spread"]

_TABLES: dict = {}

#: Bytes this process has sent and received through :func:`exchange`, by dtype name (for tests
#: and benchmarks; reset by assigning zeros).
TRAFFIC: dict = {"sent": {}, "received": {}}


def _count(kind: str, tensors) -> None:
    for t in tensors:
        key = str(t.dtype).removeprefix("torch.")
        TRAFFIC[kind][key] = TRAFFIC[kind].get(key, 0) + t.numel() * t.element_size()


@dataclass(frozen=True)
class LayoutTable:
    """Where every global rank sits in each of several layouts.

    Attributes:
        coords: [world, n_layouts, 3] int64: (dp_rank, pp_rank, tp_rank) of each global rank in
            each layout, in the order the layouts were given.
        sizes: per layout, (dp, pp, tp).
    """

    coords: torch.Tensor
    sizes: tuple[tuple[int, int, int], ...]

    def ranks(self, layout: int, *, dp: int, pp: int | None = None) -> list[int]:
        """Global ranks of data-parallel replica ``dp`` of ``layout`` (only stage ``pp`` when
        given), ordered by (pp_rank, tp_rank)."""
        c = self.coords[:, layout]
        sel = c[:, 0] == dp
        if pp is not None:
            sel &= c[:, 1] == pp
        found = torch.nonzero(sel).flatten().tolist()
        return sorted(found, key=lambda r: (int(c[r, 1]), int(c[r, 2])))


def layout_table(layouts: Sequence) -> LayoutTable:
    """The :class:`LayoutTable` of ``layouts`` (``parallel.init.ParallelLayout`` values of this
    rank, one per layout). Every rank must call it with the same layouts.

    Collectives: one all-gather over the world of [3 * n_layouts] int64 per rank, the first time
    a combination of layouts is seen (the result is cached: megatron's rank assignment is a pure
    function of the sizes).
    """
    from megatron_eaopd.parallel.init import compute_device

    key = tuple(layouts)  # this rank's coordinates; the cache is cleared whenever layouts change
    if key in _TABLES:
        return _TABLES[key]
    mine = torch.tensor(
        [[x.dp_rank, x.pp_rank, x.tp_rank] for x in layouts], dtype=torch.long
    ).flatten()
    from megatron_eaopd.parallel.groups import all_gather_rows

    out = all_gather_rows(mine.view(1, -1).to(compute_device()), dist.group.WORLD)
    coords = out.cpu().view(-1, len(layouts), 3)
    table = LayoutTable(coords, tuple((x.dp, x.pp, x.tp) for x in layouts))
    _TABLES[key] = table
    return table


def spread(sources: Sequence[int], destinations: Sequence[int]) -> list[tuple[int, int]]:
    """(source, destination) pairs that spread the destinations over the sources round-robin,
    preferring a source that is the destination itself (a local copy, no transfer)."""
    pairs = []
    for j, d in enumerate(destinations):
        pairs.append((d if d in sources else sources[j % len(sources)], d))
    return pairs


def exchange(sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]):
    """Post every send and receive of this rank, then wait for all of them.

    Args:
        sends: (destination rank, tensor) in a global order that every rank agrees on.
        recvs: (source rank, preallocated tensor) in the same global order.
    Sends to and receives from this rank itself are not allowed (copy instead); the bytes are
    added to :data:`TRAFFIC`. Between one pair
    of ranks, messages match in the order they are listed on both sides. NCCL: the operations go
    into one ``batch_isend_irecv`` (no ordering deadlock); gloo: tagged ``isend`` / ``irecv``.
    """
    me = dist.get_rank()
    if any(peer == me for peer, _ in list(sends) + list(recvs)):
        raise ValueError("exchange: a rank cannot send to or receive from itself")
    if not sends and not recvs:
        return
    _count("sent", [t for _, t in sends])
    _count("received", [t for _, t in recvs])
    from megatron_eaopd.parallel.init import uses_nccl

    if uses_nccl():  # contiguous sends, as the gloo branch's
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return
    counts: dict = {}
    works, keep = [], [t.contiguous() for _, t in sends]
    for (peer, _), t in zip(sends, keep):
        tag = counts[("s", peer)] = counts.get(("s", peer), -1) + 1
        works.append(dist.isend(t, peer, tag=tag))
    for peer, t in recvs:
        tag = counts[("r", peer)] = counts.get(("r", peer), -1) + 1
        works.append(dist.irecv(t, peer, tag=tag))
    for work in works:
        work.wait()
