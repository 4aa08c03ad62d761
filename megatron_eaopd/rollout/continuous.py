"""Continuous batching: rows freed by finished sequences are refilled with waiting prompts.

``generate(..., max_batch=m)`` with more than m prompts decodes at most m sequences at once in a
``FastDecoder`` cache of m rows (PP 1, local spec). Every row sits at its own position: a step
runs one ``FastDecoder.decode_rows`` of the live rows (each feeds its last token at its own
position, RoPE and the attention mask per row) and, when rows are free and prompts wait, one
``FastDecoder.prefill_rows`` of the next waiting prompts (right-padded, causal) into the free
cache rows; the two logit blocks are sampled together (one sampler call, so one small TP
all-gather per step). A row that finishes (EOS or its token limit) leaves at once: the last live
rows are copied into the holes (one copy of their cached positions), so the live rows are always
cache rows [0, n) and nothing finished runs through the model again.

The draws follow (position, the prompt's index in the call) through ``PositionRandoms``, so the
tokens are those of one unbatched call; the log-probs are those of the same forward (up to
floating-point rounding of different batch shapes).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megatron_eaopd.rollout.decode_graphs import DecodeGraphs
from megatron_eaopd.rollout.fast_decode import FastDecoder
from megatron_eaopd.rollout.sampling import pack_draw, to_device, unpack_draw
from megatron_eaopd.rollout.vocab_parallel import VocabParallelSampler

__all__ = ["ContinuousDecoder", "FastDecodeMismatch", "logits_match"]


class FastDecodeMismatch(RuntimeError):
    """FastDecoder's first logits differ from megatron's forward (the caller falls back)."""


# bf16 / fp16 / TF32: the largest |FastDecoder - megatron| logit difference allowed, as a fraction
# of the largest |megatron| logit. Measured on the first-step logits (benchmarks/
# bench_first_step_check.py; random weights): bf16 rounding gives 0.014 (the tests' 2-layer
# model), 0.020 (Qwen3-1.7B width, 8 layers) and 0.034 (all 28 layers, its 151,936 vocabulary),
# FastDecoder as close to an fp32 forward as megatron's own bf16 forward; planted bugs give
# 0.35-9.4 (RoPE off or one position off, attention scale x1.25, no final norm). An elementwise
# allclose at 5e-2 rejected every one of those bf16 calls.
LOW_PRECISION_TOL = 0.1


def _low_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 / fp16 logits, or fp32 ones from TF32 matmuls (the scale-relative rule)."""
    if dtype != torch.float32:
        return True
    return device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def logits_match(logits: torch.Tensor, reference: torch.Tensor, tp_group) -> bool:
    """Whether FastDecoder's logits shard equals megatron's, judged over the whole TP group.

    fp32: elementwise ``allclose`` at 1e-4 on every rank. bf16 / fp16 parameters (or TF32
    matmuls on any rank): max |logits - reference| over the group's shards <=
    ``LOW_PRECISION_TOL`` times max |reference| (rounding grows with depth and with the logits'
    scale, so an elementwise tolerance rejects correct low-precision forwards; a forward that
    differs in structure is off by a large fraction of the scale). A NaN or inf anywhere is a
    mismatch. Each rank holds a different vocabulary shard, so the verdict is agreed: 1
    all-reduce (MAX) of 5 elements, the same on every rank and path, and all ranks take the same
    path (a rank falling back alone would pair its collectives with the wrong ones: a hang)."""
    from megatron_eaopd.parallel.groups import tp_rank_and_size

    got, ref = logits.float(), reference.float()
    flags = [
        _low_precision(reference.dtype, reference.device),
        not torch.allclose(got, ref, atol=1e-4, rtol=1e-4),
        not bool(torch.isfinite(got).all() and torch.isfinite(ref).all()),
    ]
    stats = torch.cat([
        torch.tensor(flags, dtype=torch.float32, device=got.device),
        torch.stack([(got - ref).abs().max(), ref.abs().max()]),
    ])  # fmt: skip
    if tp_rank_and_size(tp_group)[1] > 1:  # MAX: a NaN could be dropped, hence the flag
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=tp_group)
    low, elementwise_bad, nonfinite, diff, scale = stats.tolist()
    if nonfinite:
        return False
    return diff <= LOW_PRECISION_TOL * scale if low else not elementwise_bad


class ContinuousDecoder:
    """One ``generate`` call's continuous-batching loop (see the module docstring).

    Args:
        module: the bare GPTModel (eval mode, logits kept vocab-parallel).
        prompts: token ids per sequence; slots: cache rows (most sequences decoded at once).
        max_new_tokens, pad_id, vocab_size, params: as ``generate``; stops: the stop ids
            (``batch.stop_ids``).
        randoms: the call's ``PositionRandoms``.
        counters: ``generate``'s counters (updated in place).
        tp_group, device: the TP group and the compute device.
        progress: called with the number of sequences finished at each step that finishes some.
        reference: ``reference(tokens [m, s]) -> logits [m, s, V_pad / tp]``, megatron's forward;
            the first prefill's logits are checked against it (``FastDecodeMismatch``).
        refill_frac: prefill waiting prompts once at least this fraction of the rows is free
            (or no row is live): a prefill is one more pass over the weights, so batching
            refills pays where a step's cost is mostly reading the weights; None: at once.
        decode_graphs: decode at static shapes (``DecodeGraphs``: CUDA graphs on a GPU).
    Attributes after ``run``: tokens [B, total], prompt_lens, response_lens [B], logprobs,
    entropies [B, total], finished [B], as ``generate``'s ``_Decoder``.
    """

    def __init__(self, module, prompts, slots, max_new_tokens, stops, pad_id, vocab_size,
                 params, randoms, counters, tp_group, device, progress=None,
                 reference=None, refill_frac=None, decode_graphs=False):  # fmt: skip
        self.stops, self.vocab_size, self.params = stops, vocab_size, params
        self.randoms, self.counters, self.tp_group = randoms, counters, tp_group
        self.device, self.progress, self.reference = device, progress, reference
        self.refill_at = 1 if refill_frac is None else max(1, round(refill_frac * slots))
        b = len(prompts)
        self.prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if int(self.prompt_lens.min()) < 1:
            raise ValueError("every prompt needs at least one token (BOS)")
        longest = int(self.prompt_lens.max())
        max_len = getattr(module, "max_sequence_length", None) or int(1e9)
        self.total = min(longest + max_new_tokens, max_len)
        if longest >= self.total:
            raise ValueError(f"a prompt of {longest} tokens leaves no room to generate")
        self.tokens = torch.full((b, self.total), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            self.tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        self.limit = torch.clamp(self.prompt_lens + max_new_tokens, max=self.total)
        self.logprobs = torch.zeros(b, self.total)
        self.entropies = torch.zeros(b, self.total)
        self.finished = torch.zeros(b, dtype=torch.bool)
        self.response_lens = torch.zeros(b, dtype=torch.long)
        self.slots = min(slots, b)
        self.fast = FastDecoder(module, self.slots, self.total, tp_group)
        # decode steps at static shapes (CUDA graphs on a GPU), else at the live ones
        self.graphs = DecodeGraphs(self.fast) if decode_graphs else None
        self.decode = self.fast.decode_rows if self.graphs is None else self.graphs
        self.sampler = None

    def _prefill(self, new: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Prefill prompts ``new`` [m] (call ids) into cache rows [first_slot, first_slot + m);
        logits [m, V_pad / tp]."""
        dev = self.device
        lens = self.prompt_lens[new]
        tokens = to_device(self.tokens[new, : int(lens.max())], dev)
        lens_dev = to_device(lens, dev)
        slots = torch.arange(first_slot, first_slot + len(new), device=dev)
        logits = self.fast.prefill_rows(tokens, lens_dev, slots)
        if self.reference is not None:
            ref = self.reference(tokens)[torch.arange(len(new), device=dev), lens_dev - 1]
            self.reference = None
            if not logits_match(logits, ref, self.tp_group):
                raise FastDecodeMismatch("FastDecoder's logits differ from megatron's forward")
            self.counters["fast"] += 1
        self.counters["prefills"] += len(new)
        self.counters["refills"] += 1
        return logits

    def run(self) -> None:
        b, dev = self.tokens.shape[0], self.device
        rows = torch.empty(0, dtype=torch.long)  # call id of each live cache row [0, n)
        pos = torch.empty(0, dtype=torch.long)  # the position each live row predicts next
        waiting = 0
        while True:
            n = len(rows)
            m = min(self.slots - n, b - waiting)
            if m < self.refill_at and n > 0:
                m = 0  # wait for more free rows
            parts = []
            if n:  # each live row feeds its last token at its own position
                fed = pos - 1
                parts.append(self.decode(  # end from the host copy: no device sync
                    to_device(self.tokens[rows, fed], dev), to_device(fed, dev), int(fed.max()) + 1
                ))  # fmt: skip
            if m:  # free rows and waiting prompts: refill
                new = torch.arange(waiting, waiting + m)
                waiting += m
                parts.append(self._prefill(new, n))
                rows, pos = torch.cat([rows, new]), torch.cat([pos, self.prompt_lens[new]])
            if not len(rows):
                break
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            self.counters["steps"] += 1
            self.counters["decode_rows"] += len(rows)
            if self.sampler is None:
                self.sampler = VocabParallelSampler(self.params, self.vocab_size,
                                                    logits.shape[-1], self.tp_group, dev,
                                                    rows=self.randoms.rows)  # fmt: skip
            keys, u = self.randoms.at(pos, rows)
            tok, lp, ent = self.sampler.draw(logits, to_device(rows, dev), keys, u)
            tok, lp, ent = unpack_draw(pack_draw(tok, lp, ent).cpu())  # one wait
            self.tokens[rows, pos] = tok
            self.logprobs[rows, pos] = lp
            self.entropies[rows, pos] = ent
            self.response_lens[rows] += 1
            eos = torch.isin(tok, self.stops)
            self.finished[rows[eos]] = True
            pos = pos + 1
            done = eos | (pos >= self.limit[rows])
            if bool(done.any()):
                rows, pos = self._drop(done, rows, pos)
        if self.sampler is not None:
            self.counters["fallbacks"] += self.sampler.counters["fallbacks"]
            self.counters["sample_elements"] += self.sampler.counters["elements"]

    def _drop(self, done, rows, pos):
        """Remove finished rows: the live rows past the new end move into the holes (a copy of
        their cached positions). No communication."""
        if self.progress is not None:
            self.progress(int(done.sum()))
        keep = ~done
        n_keep = int(keep.sum())
        holes = done[:n_keep].nonzero().squeeze(1)
        movers = keep[n_keep:].nonzero().squeeze(1) + n_keep
        order = torch.arange(n_keep)
        if len(holes):
            self.counters["compactions"] += 1
            cached = int(pos[movers].max()) - 1  # positions [0, pos - 1) are in the cache
            self.fast.move_rows(to_device(movers, self.device), to_device(holes, self.device),
                                cached)  # fmt: skip
            order[holes] = movers
        return rows[order], pos[order]


def warn_fallback() -> None:
    warnings.warn("FastDecoder's logits differ from megatron's forward; rollouts use megatron's "
                  "forward in chunks (no continuous batching)", stacklevel=3)  # fmt: skip
