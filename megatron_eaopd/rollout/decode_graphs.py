"""Decode steps at static shapes, replayed as CUDA graphs on a GPU.

A decode step runs ~15 kernels per layer on a few thousand values each; at rollout batch sizes a
GPU waits for the host to launch them. ``DecodeGraphs`` runs ``FastDecoder.decode_rows`` at a
few static shapes, so that each shape can be captured once as a CUDA graph and replayed with
one launch:

- rows: the live rows [0, n) rounded up to a multiple of ``row_multiple`` (at most the cache's
  rows). The padding rows feed token 0 at position 0 of cache rows [n, R): rows that hold no
  live sequence (a compacted decoder's dropped rows, or continuous batching's free rows, which
  a prefill rewrites from position 0 before they are read), so nothing live changes;
- keys: positions [0, L) with L the step's ``end`` rounded up to a multiple of
  ``length_bucket`` (at most the cache's length), masked per row at its own position (positions
  past a row's hold stale or zero keys and are never attended).

The inputs are copied into per-shape buffers (the graph reads them at fixed addresses); every
graph writes its logits into one output buffer [cache rows, V_pad / tp] allocated outside the
graphs' memory pool: the returned logits are **valid until the next call** (every caller samples
from them first). The graphs' intermediates share one pool, which is safe because the graphs
never run concurrently and none of their intermediates outlives its replay.

On a CUDA device each new (rows, length) shape is run twice eagerly on a side stream (warm-up:
it writes the same keys and values the step will write), captured (``capture_error_mode=
"thread_local"``) and replayed once; that replay's logits must match the warm-up's
(``continuous.logits_match``, agreed over the TP group), and a capture that raised on any TP
rank counts as failed on all of them (one all-reduce), so every rank takes the same path. Later
steps of that shape replay the graph. A failure or a mismatch warns once and every rank decodes
at the live shapes from then on. Elsewhere (CPU) the same static-shape steps run eagerly: no
speed-up, but the same bookkeeping, which is what the CPU tests check (and, with a stand-in for
the graph recorder, the capture path's).

Costs. A ``DecodeGraphs`` lives as long as its ``FastDecoder``: one ``generate`` call (or chunk),
so every call captures the shapes it meets again (each: two eager warm-up steps, a capture, which
synchronises the device and empties the allocator's cache, and a checked replay). A step reads
up to ``length_bucket - 1`` masked keys per row more than the live step, and under an explicit
mask ``scaled_dot_product_attention`` cannot use the flash kernel (the live decode step of the
plain decoder passes no mask). Whether this pays is for a GPU measurement to say
(``benchmarks/bench_rollout_gpu.py``).

The logits equal ``decode_rows`` at the live shapes up to floating-point rounding (a longer
masked key range can change the attention kernel's summation order), not necessarily bitwise.
Collectives: those of ``decode_rows`` (TP all-reduces), captured into the graph with NCCL, and
per capture those of ``_capture``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["DecodeGraphs"]


def _round_up(x: int, multiple: int, cap: int) -> int:
    return min(cap, -(-x // multiple) * multiple)


class DecodeGraphs:
    """Static-shape (CUDA-graphed on a GPU) ``decode_rows`` of a ``FastDecoder``.

    Args:
        fast: the FastDecoder (PP 1) whose cache the steps read and write.
        row_multiple: live rows are padded up to a multiple of this (fewer shapes to capture,
            at the cost of up to ``row_multiple - 1`` idle rows per step).
        length_bucket: keys are read up to a multiple of this (fewer shapes; up to
            ``length_bucket - 1`` masked keys per row and step).
        capture: capture CUDA graphs (default: when the cache is on a CUDA device).
    Attributes:
        counters: captures (graphs captured), replays, eager (static-shape steps run eagerly,
            or live-shape steps after a failed capture).
    """

    def __init__(self, fast, row_multiple: int = 8, length_bucket: int = 256,
                 capture: bool | None = None):  # fmt: skip
        if row_multiple < 1 or length_bucket < 1:
            raise ValueError(f"row_multiple and length_bucket must be >= 1, got {row_multiple} "
                             f"and {length_bucket}")  # fmt: skip
        self.fast = fast
        self.rows, self.total = fast.k.shape[1], fast.k.shape[3]
        self.row_multiple, self.length_bucket = row_multiple, length_bucket
        self.device = fast.k.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # R -> (tokens, positions)
        self.graphs: dict[tuple[int, int], Callable[[], None]] = {}  # (R, L) -> replay
        self.out = None  # [rows, V_pad / tp]: every graph writes its logits here
        self.pool = None
        self.broken = False
        self.counters = {"captures": 0, "replays": 0, "eager": 0}

    def shape(self, n: int, end: int) -> tuple[int, int]:
        """The static (rows, key length) a step of ``n`` live rows reading keys [0, end) runs at."""
        return (_round_up(n, self.row_multiple, self.rows),
                _round_up(end, self.length_bucket, self.total))  # fmt: skip

    def __call__(self, tokens: torch.Tensor, positions, end: int) -> torch.Tensor:
        """``fast.decode_rows(tokens, positions, end)`` at a static shape.

        tokens: [n] int64, the input token of cache rows [0, n); positions: [n] int64 (device),
        each row's position (< ``end``), or one int for every row. Returns logits
        [n, V_pad / tp], valid until the next call. A replay does not synchronise the host with
        the device; a capture does (and makes the collectives of ``_capture``).
        """
        n = tokens.shape[0]
        if self.broken:
            self.counters["eager"] += 1
            if isinstance(positions, int):
                positions = torch.full((n,), positions, dtype=torch.long, device=self.device)
            return self.fast.decode_rows(tokens, positions, end)
        rows, length = self.shape(n, int(end))
        buffers = self.inputs.get(rows)
        if buffers is None:
            buffers = self.inputs[rows] = (
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device),
            )
        tok, pos = buffers
        tok[:n].copy_(tokens)
        if isinstance(positions, int):
            pos[:n].fill_(positions)
        else:
            pos[:n].copy_(positions)
        if n < rows:  # padding rows: token 0 at position 0 of rows holding no live sequence
            tok[n:].zero_()
            pos[n:].zero_()
        if not self.capture:
            self.counters["eager"] += 1
            return self.fast.decode_rows(tok, pos, length)[:n]
        replay = self.graphs.get((rows, length))
        if replay is None:
            replay = self._capture(tok, pos, rows, length)
            if replay is None:  # refused on some rank: every rank is broken, at the live shapes
                return self(tokens, positions, end)
            self.graphs[(rows, length)] = replay  # its first replay ran in _capture
        else:
            replay()
        self.counters["replays"] += 1
        return self.out[:n]

    def add_counters(self, counters: dict) -> None:
        """Add this object's counters to ``generate``'s (graph_captures, graph_replays,
        static_eager)."""
        counters["graph_captures"] += self.counters["captures"]
        counters["graph_replays"] += self.counters["replays"]
        counters["static_eager"] += self.counters["eager"]

    def _capture(self, tok: torch.Tensor, pos: torch.Tensor, rows: int, length: int):
        """Warm up, capture and replay once the step at (rows, length) whose inputs are in
        ``tok`` / ``pos``; the replay() callable, or None when the capture failed on any TP rank
        (agreed before any rank replays: a replay runs the collectives) or the replay's logits
        differ from the warm-up's (then every rank is ``broken``, with one warning). Two
        warm-up steps run eagerly (a side stream on CUDA): they write the keys and values the
        step writes; an error in them is raised like any step's. Collectives: the warm-ups'
        and the replay's (those of ``decode_rows``), 1 all-reduce of one element (did any rank
        fail) and the 5-element one of ``continuous.logits_match`` (the replay against the
        warm-up, agreed over TP)."""
        from megatron_eaopd.parallel.groups import any_rank
        from megatron_eaopd.rollout.continuous import logits_match

        def step():
            return self.fast.decode_rows(tok, pos, length)

        warm = self._warm_up(step)  # eager steps: an error here is the step's own
        if self.out is None:  # outside the graphs' pool: one buffer for every shape
            self.out = torch.empty(self.rows, warm.shape[1], dtype=warm.dtype,
                                   device=self.device)  # fmt: skip
        out = self.out[:rows]
        error, replay = None, None
        try:  # a capture records the collectives without running them
            replay = self._record(lambda: out.copy_(step()))
        except Exception as exc:  # noqa: BLE001 - decided below, together with the other ranks
            error = exc
        group = self.fast.group
        failed = any_rank(error is not None, group, self.device)  # before any replay runs
        if not failed:
            replay()
            if logits_match(out, warm, group):
                self.counters["captures"] += 1
                return replay
        self.broken = True
        self.graphs.clear()
        why = f"failed: {error}" if error is not None else "failed on another TP rank"
        if not failed:
            why = "gave other logits than the eager step"
        warnings.warn(f"CUDA graph capture of the decode step {why}; decoding eagerly",
                      stacklevel=3)  # fmt: skip
        return None

    def _warm_up(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``step`` twice (on a side stream on CUDA, as capture needs); its second logits."""
        if self.device.type != "cuda":
            step()
            return step()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()
            warm = step()
        current.wait_stream(side)
        return warm

    def _record(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Capture ``fn`` as a CUDA graph (in the shared pool); its replay. On a failed capture
        the current stream is restored and the device synchronised before the error goes on."""
        stream = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                fn()
        except BaseException:
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(self.device)
            raise
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay
