"""Autoregressive sampling from a megatron-core GPTModel under tensor parallelism, with a KV cache.

The decoder is our own loop over the model's forward; the KV cache is megatron-core's
``StaticInferenceContext`` (the attention layers write keys and values into it and read them back,
and the model returns only the last position's logits). ``use_kv_cache=False`` re-runs the whole
prefix for every token instead: the reference for the tests and the benchmark.

Sequences are right-padded and position-aligned, as in training: sequence i has its prompt in
positions ``[0, p_i)``. Decoding starts at the shortest prompt; at a position still inside a longer
prompt the prompt token is kept and nothing is sampled (megatron's legacy generation does the
same). So every token sees exactly the context and positions it has in the training forward, and
the log-probs kept for the PPO ratio are those a fresh forward of the finished sequence gives.

Under TP the logits stay vocab-parallel: ``VocabParallelSampler`` draws the token, its log-prob
and the entropy with one small all-gather per step ([b, 6] float64 for plain sampling, whatever the
vocabulary; see ``vocab_parallel``), and every rank merges the gathered packet identically, so the
ranks cannot diverge and no broadcast is needed. The draw is the same at every TP size (plain
sampling: at every TP size whose shard width is, or at every one whose width is not, a multiple of
64; see ``vocab_parallel``).

Finished sequences stop costing compute: when a quarter of the decode batch (``compact_frac``)
has finished, their rows are dropped from the decode batch and from every layer's KV cache (one
copy of the live cache entries). With more prompts than ``max_batch`` the waiting prompts are
prefilled into the rows that finished sequences free (continuous batching, ``continuous``;
``FastDecoder`` only, else chunks of ``max_batch`` run one after another). The random numbers
follow (position, the prompt's index in the call) (``sampling.PositionRandoms``), so neither
compaction, chunks nor refills change a token.

Under pipeline parallelism (one model chunk per rank, no virtual stages) every step runs the
stages in order: a stage receives the previous stage's hidden states (p2p recv), runs its layers
(each stage keeps the KV cache of its own layers: ``FastDecoder``'s, or megatron's
``StaticInferenceContext`` where FastDecoder does not apply or its first-step check, judged on
the last stage and agreed over the pipeline group, failed) and sends its output to the next
stage; the last stage samples (every stage draws the same numbers from ``generator``, so
all end with the same generator state) and broadcasts the tokens, log-probs and entropies over
the pipeline group, so every rank ends with the same ``RolloutBatch``. The last stage samples
vocab-parallel too (its own TP group), and every stage compacts its own KV cache identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_eaopd.parallel.groups import any_rank
from megatron_eaopd.rollout.arguments import check_agreement, check_call
from megatron_eaopd.rollout.batch import RolloutBatch, rollout_result, stop_ids
from megatron_eaopd.rollout.continuous import (
    ContinuousDecoder,
    FastDecodeMismatch,
    logits_match,
    warn_fallback,
)
from megatron_eaopd.rollout.decode_graphs import DecodeGraphs
from megatron_eaopd.rollout.fast_decode import FastDecoder, compact_rows
from megatron_eaopd.rollout.interleave import run_interleaved, split_rows
from megatron_eaopd.rollout.sampling import (
    PositionRandoms,
    SamplingParams,
    pack_draw,
    to_device,
    unpack_draw,
)
from megatron_eaopd.rollout.vocab_parallel import VocabParallelSampler

__all__ = ["RolloutBatch", "generate"]


def _device(module) -> torch.device:
    """The device of the model's parameters (inputs, caches and sampler tensors go there; a
    stage without parameters: the current device)."""
    from megatron_eaopd.parallel.init import compute_device

    param = next(module.parameters(), None)
    return compute_device() if param is None else param.device


def _bare_module(model):
    """The GPTModel inside a one-chunk list, a FrozenTeacher or megatron's DDP wrapper."""
    if hasattr(model, "chunks"):  # FrozenTeacher
        model = model.chunks
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"rollouts need one model chunk (no virtual PP), got {len(model)}")
        model = model[0]
    while hasattr(model, "module"):  # megatron DDP / Float16Module wrappers
        model = model.module
    return model


@contextlib.contextmanager
def _without_cpu_device_mode():
    """Leave the CPU compatibility layer's torch function mode for the block (it costs a Python
    call per torch op); yields the mode (None when it is not the innermost mode), which megatron's
    own forwards re-enter (``_Decoder._stage``): only they need it."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    from megatron_eaopd.compat.cpu import CpuDeviceMode

    stack = _get_current_function_mode_stack()
    if not (stack and isinstance(stack[-1], CpuDeviceMode)):
        yield None
        return
    with _pop_mode_temporarily() as mode:
        yield mode


@contextlib.contextmanager
def _vocab_parallel_output(module):
    """Keep the output layer's logits vocab-parallel ([s, b, V_pad / tp]) during the block.

    megatron-core's GPTModel asserts ``runtime_gather_output`` in inference mode; we pass True to
    the model and a forward pre-hook on its output layer turns it back to False, so the
    vocabulary is never gathered (the sampler works on the shards)."""
    layer = getattr(module, "output_layer", None) if getattr(module, "post_process", True) else None
    if layer is None:
        yield
        return

    def hook(_mod, args, kwargs):
        return args, dict(kwargs, runtime_gather_output=False)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    vocab_size: int,
    params: SamplingParams,
    generator: torch.Generator,
    use_kv_cache: bool = True,
    max_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
    compact_frac: float | None = 0.25,
    stats: dict | None = None,
    fast_decode: bool = True,
    continuous: bool = True,
    refill_frac: float | None = None,
    pp_interleave: bool = False,
    decode_graphs: bool = False,
) -> RolloutBatch:
    """Sample one response per prompt (repeat a prompt for several samples).

    Args:
        model: a GPTModel (bare, DDP-wrapped, a one-chunk list, or a FrozenTeacher) built under
            the current megatron layout (no virtual PP); its logits are [b, s, V_pad / tp].
        prompts: token ids per sequence (BOS included).
        max_new_tokens: most generated tokens per sequence (EOS included); a sequence also
            ends, unfinished, at the model's ``max_sequence_length`` positions.
        eos_id: the id, or a list of ids, that end a response (it stops after the first one
            it samples; a negative id: none). pad_id: fills the rows after the end.
        vocab_size: real vocabulary; padded logit columns are never sampled.
        params: temperature / top-k / top-p / log-prob temperature (a top-k of at least the
            vocabulary keeps every token: plain sampling).
        generator: CPU generator of the draws (one 32-bit key per position for plain sampling,
            one uniform per sequence and position for top-k / top-p, drawn in position order from
            the shortest prompt's length on); seed it the same on every rank of the TP group.
            The tokens do not depend on ``max_batch``, ``continuous`` or ``compact_frac``.
        use_kv_cache: decode with megatron's static KV cache; False re-runs the prefix each step.
        max_batch: decode at most this many sequences at once (continuous batching, or chunks
            run one after another).
        progress: called with the number of sequences finished (after each chunk; with
            continuous batching after each step that finishes some).
        compact_frac: drop finished rows from the decode batch (and KV cache) once at least this
            fraction of it has finished; None never compacts. Never changes the tokens. (With
            continuous batching finished rows always leave at once.)
        stats: if given, filled with counters: steps, decode_rows (rows run through the model,
            summed over steps; a prefilled row counts once), compactions, fallbacks (filtered
            steps that gathered the vocabulary), sample_elements (elements of the sampler's
            collectives on this rank), fast (chunks decoded by ``FastDecoder``; 1 for a
            continuous call), continuous (1 when continuous batching ran), prefills (prompts
            prefilled into freed rows) and refills (prefill forwards), continuous batching;
            interleaved (chunks whose groups interleaved under PP; steps and decode_rows then
            count each group's steps); with ``decode_graphs``: graph_captures, graph_replays
            and static_eager (static-shape steps run eagerly: the CPU, or after a failed capture).
        continuous: with more prompts than ``max_batch``, refill the rows of finished sequences
            with waiting prompts (needs ``use_kv_cache``, ``fast_decode`` and a model
            ``FastDecoder`` supports; otherwise, or False, chunks).
        refill_frac: continuous batching prefills waiting prompts once at least this fraction
            of ``max_batch`` rows is free (one prefill forward for several prompts); None (the
            default: measured faster, bench_rollout.py ``continuous``): as soon as one row is
            free. Never changes the tokens.
        fast_decode: decode with ``FastDecoder`` (our lean forward of the same weights) where it
            supports the model (local spec, every pipeline stage; continuous batching PP 1 only)
            and its first logits match megatron's forward; else megatron's forward with its
            ``StaticInferenceContext``.
        pp_interleave: under pipeline parallelism with ``FastDecoder``, split each chunk into
            PP groups of rows whose decode steps interleave over the stages (each stage works
            on one group while the next works on another: ``rollout.interleave``). Never
            changes the tokens. Off by default: measured on CPU faster at 64 rows (1.11-1.17x),
            slower at 32 rows of a small model (0.78x); not measured on a GPU.
        decode_graphs: run FastDecoder's decode steps at static shapes
            (``rollout.decode_graphs.DecodeGraphs``), captured and replayed as CUDA graphs on a
            GPU; PP 1 only (ignored under PP). On the CPU the same static-shape steps run
            eagerly (slower: the path the CPU tests check). The tokens may differ from the
            default path only where float rounding of a longer masked key range decides a tie.
    A model built with sequence parallelism generates with it switched off
    (``models.sequence_parallel.sequence_parallel_off``), restored on return.
    Every rank of a data-parallel replica's TP x PP group must pass the same arguments (and
    generator state): checked with one all-gather of one int64 per call (ValueError on every
    rank). Prompt ids and ``pad_id`` must lie in [0, ``vocab_size``).
    Returns:
        RolloutBatch (on every rank).
    Collectives per decoded position: 1 TP all-gather of [b, 6] float64 (plain sampling; top-k /
    top-p: [b, 6 + 2 (c + 1)], plus one of [b, V_pad / tp] on a fallback step), besides the
    model's own TP all-reduces; under PP also 1 p2p send/recv of the hidden states between
    neighbouring stages ([b, n, h] FastDecoder, [n, b, h] megatron's forward) and 1 broadcast of
    [3, b] from the last stage over the pipeline group (and per chunk, under PP, 1 all-reduce of
    one element: whether every stage can use FastDecoder, and 1 of its first check's verdict).
    """
    from megatron_eaopd.models.sequence_parallel import sequence_parallel_off

    # a decode step feeds one position, which cannot be split over the TP ranks: a model built
    # with sequence parallelism generates with it switched off (same weights, same function)
    with sequence_parallel_off(model):
        return _generate(
            model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            vocab_size=vocab_size, params=params, generator=generator, use_kv_cache=use_kv_cache,
            max_batch=max_batch, progress=progress, compact_frac=compact_frac, stats=stats,
            fast_decode=fast_decode, continuous=continuous, refill_frac=refill_frac,
            pp_interleave=pp_interleave, decode_graphs=decode_graphs,
        )  # fmt: skip


def _generate(model, prompts, *, max_new_tokens, eos_id, pad_id, vocab_size, params, generator,
              use_kv_cache, max_batch, progress, compact_frac, stats, fast_decode,
              continuous, refill_frac, pp_interleave, decode_graphs):  # fmt: skip
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            raise ValueError("rollouts under virtual pipeline parallelism are not supported")
    prompts = check_call(prompts, max_new_tokens, pad_id, vocab_size)
    if not prompts:
        raise ValueError("no prompts to generate from")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (the draws are made on the CPU, the same "
            f"on every rank, then moved to the model's device), got {generator!r}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = stop_ids(eos_id, vocab_size)  # a CPU tensor of the stop ids
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):  # 0 used to mean "all at once" silently
        raise ValueError(f"max_batch must be an int >= 1 or None, got {max_batch!r}")
    for name, frac in (("compact_frac", compact_frac), ("refill_frac", refill_frac)):
        if frac is not None and not 0 < frac <= 1:
            raise ValueError(f"{name} must be in (0, 1] or None, got {frac}")
    if params.top_k >= vocab_size:  # keeps every token: no truncation (and no fallback steps)
        params = dataclasses.replace(params, top_k=0)
    module = _bare_module(model)
    options = (max_batch, use_kv_cache, compact_frac, continuous, fast_decode, refill_frac,
               pp_interleave, decode_graphs)  # fmt: skip
    check_agreement(prompts, max_new_tokens, stops.tolist(), pad_id, params, generator,
                    _device(module), options)  # fmt: skip
    was_training = module.training
    module.eval()
    counters = {"steps": 0, "decode_rows": 0, "compactions": 0, "fallbacks": 0,
                "sample_elements": 0, "fast": 0, "continuous": 0, "prefills": 0,
                "refills": 0, "interleaved": 0, "graph_captures": 0, "graph_replays": 0,
                "static_eager": 0}  # fmt: skip
    randoms = PositionRandoms(generator, len(prompts), params.filtered,
                              min(len(p) for p in prompts))  # fmt: skip
    step = max_batch or len(prompts)
    refill = (continuous and step < len(prompts) and use_kv_cache and fast_decode and pp == 1
              and FastDecoder.unsupported(module) is None)  # fmt: skip
    try:
        out = []
        with _vocab_parallel_output(module), _without_cpu_device_mode() as cpu_mode:
            if refill:
                try:
                    return _continuous(module, prompts, step, max_new_tokens, stops, pad_id,
                                       vocab_size, params, randoms, counters, progress, cpu_mode,
                                       stats, refill_frac, decode_graphs)  # fmt: skip
                except FastDecodeMismatch:
                    warn_fallback()
                    fast_decode = False
            groups = pp if (pp > 1 and pp_interleave and use_kv_cache and fast_decode
                            and FastDecoder.unsupported(module) is None) else 1  # fmt: skip
            rest = (max_new_tokens, stops, pad_id, vocab_size, params, use_kv_cache,
                    compact_frac, counters, fast_decode, cpu_mode, randoms,
                    decode_graphs)  # fmt: skip
            for start in range(0, len(prompts), step):
                chunk = prompts[start : start + step]
                if groups > 1 and len(chunk) > 1:
                    decoders, share = [], None
                    for lo, hi in split_rows(len(chunk), groups):
                        share = _Decoder(module, chunk[lo:hi], *rest, start + lo, share=share)
                        decoders.append(share)
                    out.extend(run_interleaved(decoders, counters))
                    del decoders, share  # their KV caches go before the next chunk's
                else:
                    decoder = _Decoder(module, chunk, *rest, start)
                    out.append(decoder.run())
                    del decoder  # its KV cache and weight copies go before the next chunk's
                if progress is not None:
                    progress(len(chunk))
    finally:
        module.train(was_training)
    if stats is not None:
        stats.update(counters)
    return out[0] if len(out) == 1 else RolloutBatch.concat(out, pad_id)


def _continuous(module, prompts, slots, max_new_tokens, stops, pad_id, vocab_size, params,
                randoms, counters, progress, cpu_mode, stats, refill_frac,
                decode_graphs) -> RolloutBatch:  # fmt: skip
    """Continuous batching (``continuous.ContinuousDecoder``) at PP 1 with ``FastDecoder``."""
    from megatron.core import parallel_state as ps

    def reference(tokens):  # megatron's forward of right-padded prompts [m, s]
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        with cpu_mode if cpu_mode is not None else contextlib.nullcontext():
            return module(tokens, pos, None, runtime_gather_output=True)

    decoder = ContinuousDecoder(
        module, prompts, slots, max_new_tokens, stops, pad_id, vocab_size, params, randoms,
        counters, ps.get_tensor_model_parallel_group(), _device(module), progress, reference,
        refill_frac, decode_graphs,
    )  # fmt: skip
    decoder.run()
    if decoder.graphs is not None:
        decoder.graphs.add_counters(counters)
    counters["continuous"] = 1
    if stats is not None:
        stats.update(counters)
    return rollout_result(decoder, pad_id)


_CHECK_ROWS = 4  # rows of the first-step check of FastDecoder against megatron's forward


class _Decoder:
    """One chunk's decode loop. Rows of the decode batch are ``active`` (original row ids);
    the full-batch records (tokens, log-probs, entropies) live on the CPU."""

    def __init__(self, module, prompts, max_new_tokens, stops, pad_id, vocab_size, params,
                 use_kv_cache, compact_frac, counters, fast_decode, cpu_mode, randoms,
                 decode_graphs, offset, share=None):  # fmt: skip
        from megatron.core import parallel_state as ps
        from megatron.core.inference.contexts import StaticInferenceContext

        self.module, self.stops, self.pad_id = module, stops, pad_id
        self.vocab_size, self.params, self.compact_frac = vocab_size, params, compact_frac
        self.counters, self.cpu_mode = counters, cpu_mode
        self.randoms, self.offset = randoms, offset  # offset: call id of this chunk's row 0
        self.device = device = _device(module)
        b = self.b = len(prompts)
        prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if int(prompt_lens.min()) < 1:
            raise ValueError("every prompt needs at least one token (BOS)")
        max_len = getattr(module, "max_sequence_length", None) or int(1e9)
        total = self.total = min(int(prompt_lens.max()) + max_new_tokens, max_len)
        if int(prompt_lens.max()) >= total:
            raise ValueError(
                f"a prompt of {int(prompt_lens.max())} tokens leaves no room to generate"
            )
        tokens = torch.full((b, total), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        self.tokens, self.prompt_lens = tokens, prompt_lens
        self.limit = torch.clamp(prompt_lens + max_new_tokens, max=total)  # exclusive end
        self.logprobs = torch.zeros(b, total)
        self.entropies = torch.zeros(b, total)
        self.finished = torch.zeros(b, dtype=torch.bool)
        self.response_lens = torch.zeros(b, dtype=torch.long)
        # the decode batch (compacted as rows finish)
        self.active = torch.arange(b)
        self.done = torch.zeros(b, dtype=torch.bool)
        self.cur_prompt_lens, self.cur_limit = prompt_lens.clone(), self.limit.clone()
        self.cur_tokens = tokens.to(device)
        self.positions = torch.arange(total, device=device).unsqueeze(0)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = self.pp == 1 or ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = self.pp == 1 or ps.is_pipeline_last_stage(ignore_virtual=True)
        if self.pp > 1:
            self.pp_group = ps.get_pipeline_model_parallel_group()
            self.pp_last = ps.get_pipeline_model_parallel_last_rank()
            self.pp_prev = ps.get_pipeline_model_parallel_prev_rank()
            self.pp_next = ps.get_pipeline_model_parallel_next_rank()
        self.context = StaticInferenceContext(b, total) if use_kv_cache else None
        self.cached = 0
        self.fast = None
        reason = FastDecoder.unsupported(module) if use_kv_cache and fast_decode else None
        if reason is not None:  # shown once per reason (the default warnings filter)
            warnings.warn(f"rollouts decode with megatron's forward, slower: FastDecoder does "
                          f"not support this model ({reason})", stacklevel=2)  # fmt: skip
        unfit = not (use_kv_cache and fast_decode) or reason is not None
        # some reasons exist on one stage only: all stages or none (else the p2p pair wrongly)
        if not any_rank(unfit, self.pp_group if self.pp > 1 else None, device):
            self.fast = FastDecoder(module, b, total, self.tp_group,
                                    share=None if share is None else share.fast)  # fmt: skip
        # decode steps at static shapes (CUDA graphs on a GPU); decode_rows is PP 1 only
        use_graphs = decode_graphs and self.fast is not None and self.pp == 1
        self.graphs = DecodeGraphs(self.fast) if use_graphs else None
        self.sampler = None
        self.t = int(prompt_lens.min())  # the position the next step samples
        self.alive = True  # steps remain
        self._logits = None  # ``forward``'s logits until ``finish`` draws from them

    def _stage(self, start: int, end: int, rows: int | None = None, **kw):
        """This stage's forward of positions [start, end) of the first ``rows`` rows (None: all
        n); the last stage returns its logits [n, end - start (or 1), V_pad / tp]. PP: 1 recv
        and/or 1 send of [end - start, n, h]."""
        module = self.module
        n = self.cur_tokens.shape[0] if rows is None else rows
        if not self.first:
            cfg = module.config  # the previous stage's output: fp32 with fp32 residuals
            dtype = torch.float32 if cfg.fp32_residual_connection else cfg.params_dtype
            hidden = torch.empty(end - start, n, cfg.hidden_size, dtype=dtype,
                                 device=self.device)  # fmt: skip
            dist.recv(hidden, src=self.pp_prev)
            module.set_input_tensor(hidden)
        pos = self.positions[:, start:end].expand(n, end - start)
        # megatron builds masks with device="cuda": its forwards need the CPU function mode,
        # except a PP 1 decode step (no mask)
        decode = kw.get("inference_context") is not None and start > 0 and self.pp == 1
        mode = contextlib.nullcontext() if self.cpu_mode is None or decode else self.cpu_mode
        with mode:
            out = module(self.cur_tokens[:n, start:end], pos, None, runtime_gather_output=True,
                         **kw)  # fmt: skip
        if not self.last:
            dist.send(out.contiguous(), dst=self.pp_next)
            return None
        return out

    def _next_logits(self, t: int):
        """Vocab-parallel logits [n, V_pad / tp] predicting position t (None off the last stage)."""
        if self.fast is not None:
            return self._fast_logits(t)
        if self.context is None:
            out = self._stage(0, t)
        else:
            self.context.sequence_len_offset = self.cached
            decode = self.cached > 0
            if decode:
                self.context.enable_decode_mode()
            out = self._stage(self.cached, t, inference_context=self.context)
            self.cached = t
        return None if out is None else out[:, -1, :]

    def _fast_logits(self, t: int):
        """FastDecoder's logits [n, V_pad / tp]; its first (prefill) logits are checked against
        megatron's forward of the same prefix, and a mismatch switches to megatron's path. The
        check runs on the first ``_CHECK_ROWS`` rows: every row holds prompt tokens at the
        prefilled positions [0, shortest prompt), so the rows differ only in their values, and
        megatron's forward of the whole batch would cost a prefill of every row."""
        if self.graphs is not None and self.cached > 0:  # a decode step: position cached
            logits = self.graphs(self.cur_tokens[:, self.cached], self.cached, t)
        else:
            logits = self.fast.forward(self.cur_tokens[:, self.cached : t], self.cached)
        if self.cached == 0:
            m = min(_CHECK_ROWS, self.cur_tokens.shape[0])
            reference = self._stage(0, t, rows=m)  # None off the last stage
            # judged on the last stage (agreed across its TP ranks), then by every stage
            bad = self.last and not logits_match(logits[:m], reference[:, -1, :], self.tp_group)
            if any_rank(bad, self.pp_group if self.pp > 1 else None, self.device):
                warnings.warn("FastDecoder's logits differ from megatron's forward; rollouts "
                              "use megatron's forward", stacklevel=2)  # fmt: skip
                self.fast = self.graphs = None
                return self._next_logits(t)
            self.counters["fast"] += 1
        self.cached = t
        return logits

    def _draw(self, t: int):
        """The draw of step t from the logits ``forward`` left: (tokens, log-probs, entropies)
        of the decode batch, on every stage. Collectives: the sampler's (last stage); under PP
        1 broadcast of [3, n] over the pipeline group."""
        n = self.cur_tokens.shape[0]
        logits, self._logits = self._logits, None
        packed = None
        rows = self.active + self.offset  # ids in the call: the random numbers follow them
        # every stage draws (host work only): its generator then ends where the last stage's
        # does, so the caller's next generate with the same generator agrees over the stages
        keys, u = self.randoms.at(torch.full_like(rows, t), rows)
        if self.last:
            if self.sampler is None:
                self.sampler = VocabParallelSampler(
                    self.params, self.vocab_size, logits.shape[-1], self.tp_group, self.device,
                    rows=self.randoms.rows,
                )  # fmt: skip
            new, lp, ent = self.sampler.draw(logits, to_device(rows, self.device), keys, u)
            packed = pack_draw(new, lp, ent)
        if self.pp > 1:
            if packed is None:
                packed = torch.empty(3, n, dtype=torch.float64, device=self.device)
            dist.broadcast(packed, src=self.pp_last, group=self.pp_group)
        return unpack_draw(packed.cpu())  # the step's one wait for the device

    def run(self) -> RolloutBatch:
        """Every step of this chunk, then its RolloutBatch."""
        while self.alive:
            self.forward()
            self.finish()
        return self.result()

    def forward(self) -> None:
        """The first half of step ``t``: this stage's forward (the logits, kept on the last
        stage). Collectives: the model's (module docstring of ``generate``)."""
        self._logits = self._next_logits(self.t)

    def finish(self) -> bool:
        """The second half of step ``t``: draw (last stage), share the draw over the pipeline,
        record it, compact. Returns ``alive``: whether steps remain."""
        t = self.t
        self.counters["steps"] += 1
        self.counters["decode_rows"] += int(self.cur_tokens.shape[0])
        new, lp, ent = self._draw(t)
        generating = (t >= self.cur_prompt_lens) & ~self.done & (t < self.cur_limit)
        rows = self.active[generating]
        new_g = new[generating]
        self.tokens[rows, t] = new_g
        self.logprobs[rows, t] = lp[generating]
        self.entropies[rows, t] = ent[generating]
        self.response_lens[rows] += 1
        hit_eos = generating & torch.isin(new, self.stops)
        self.finished[self.active[hit_eos]] = True
        self.done |= hit_eos | (t + 1 >= self.cur_limit)
        col = torch.where(generating, new, self.tokens[self.active, t])
        self.cur_tokens[:, t] = to_device(col, self.device)
        self.t = t = t + 1
        n_done = int(self.done.sum())
        self.alive = n_done < self.done.shape[0] and t < self.total
        frac = self.compact_frac
        if self.alive and frac is not None and n_done >= frac * len(self.done):
            self._compact(~self.done)
        return self.alive

    def result(self) -> RolloutBatch:
        """The finished chunk's RolloutBatch (and the sampler's counters)."""
        if self.sampler is not None:
            self.counters["fallbacks"] += self.sampler.counters["fallbacks"]
            self.counters["sample_elements"] += self.sampler.counters["elements"]
        if self.graphs is not None:
            self.graphs.add_counters(self.counters)
        return rollout_result(self, self.pad_id)

    def _compact(self, keep: torch.Tensor) -> None:
        """Drop the finished rows from the decode batch and from every layer's KV cache (the
        first ``cached`` positions of the live rows moved to the front in place,
        ``compact_rows``: no second cache). No communication."""
        self.counters["compactions"] += 1
        idx = keep.nonzero().squeeze(1)
        self.active, self.done = self.active[idx], self.done[idx]
        self.cur_prompt_lens, self.cur_limit = self.cur_prompt_lens[idx], self.cur_limit[idx]
        dev_idx = to_device(idx, self.device)
        self.cur_tokens = self.cur_tokens.index_select(0, dev_idx)
        if self.fast is not None:
            self.fast.compact(dev_idx, self.cached)
            return
        if self.context is None:
            return
        memory = self.context.key_value_memory_dict
        for layer, kv in memory.items():  # [S, b, ...] keys and values of one layer
            for m in kv:  # in place, then a view of the kept rows (megatron writes rows [0, n))
                compact_rows(m, dev_idx, self.cached, batch_dim=1, pos_dim=0)
            memory[layer] = tuple(m[:, : len(idx)] for m in kv)
