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

The inputs are copied into per-shape buffers (the graph reads them at fixed addresses) and the
logits come back in the graph's output buffer: **valid until the next call** (every caller
samples from them first). All graphs share one memory pool, which is safe because no graph's
output is read after another graph is replayed.

On a CUDA device each new (rows, length) shape is run twice eagerly on a side stream (warm-up:
it writes the same keys and values the step will write), then captured; later steps of that
shape replay it. Elsewhere (CPU) the same static-shape steps run eagerly: no speed-up, but the
same bookkeeping, which is what the CPU tests check. If a capture fails, this object warns once
and decodes eagerly at the live shapes from then on.

The logits equal ``decode_rows`` at the live shapes up to floating-point rounding (a longer
masked key range can change the attention kernel's summation order), not necessarily bitwise.
Collectives: those of ``decode_rows`` (TP all-reduces), captured into the graph with NCCL.
"""

from __future__ import annotations

import warnings

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
        self.graphs: dict[tuple[int, int], tuple] = {}  # (R, L) -> (graph, logits)
        self.pool = None
        self.broken = False
        self.counters = {"captures": 0, "replays": 0, "eager": 0}

    def shape(self, n: int, end: int) -> tuple[int, int]:
        """The static (rows, key length) a step of ``n`` live rows reading keys [0, end) runs at."""
        return (_round_up(n, self.row_multiple, self.rows),
                _round_up(end, self.length_bucket, self.total))  # fmt: skip

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, end: int) -> torch.Tensor:
        """``fast.decode_rows(tokens, positions, end)`` at a static shape.

        tokens: [n] int64, the input token of cache rows [0, n); positions: [n] int64 (device),
        each row's position (< ``end``), or one int for every row. Returns logits
        [n, V_pad / tp], valid until the next call. No host-device synchronisation.
        """
        n = tokens.shape[0]
        if self.broken:
            self.counters["eager"] += 1
            return self.fast.decode_rows(tokens, self._tensor(positions, n), end)
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
        entry = self.graphs.get((rows, length))
        if entry is None:
            try:
                entry = self.graphs[(rows, length)] = self._capture(tok, pos, length)
            except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: stay eager
                self.broken = True
                self.graphs.clear()
                warnings.warn(f"CUDA graph capture of the decode step failed ({exc}); decoding "
                              f"eagerly", stacklevel=2)  # fmt: skip
                self.counters["eager"] += 1
                return self.fast.decode_rows(tokens, self._tensor(positions, n), end)
        graph, logits = entry
        graph.replay()
        self.counters["replays"] += 1
        return logits[:n]

    def _tensor(self, positions, n: int) -> torch.Tensor:
        if isinstance(positions, int):
            return torch.full((n,), positions, dtype=torch.long, device=self.device)
        return positions

    def add_counters(self, counters: dict) -> None:
        """Add this object's counters to ``generate``'s (graph_captures, graph_replays,
        static_eager)."""
        counters["graph_captures"] += self.counters["captures"]
        counters["graph_replays"] += self.counters["replays"]
        counters["static_eager"] += self.counters["eager"]

    def _capture(self, tok: torch.Tensor, pos: torch.Tensor, length: int):
        """Warm up on a side stream (the step's own writes), capture; (graph, logits)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fast.decode_rows(tok, pos, length)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.fast.decode_rows(tok, pos, length)
        if self.pool is None:
            self.pool = graph.pool()
        self.counters["captures"] += 1
        return graph, logits
