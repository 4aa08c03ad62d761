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

Under TP every rank has the full-vocabulary logits (one all-gather per step), samples with its
own copy of the generator, and the tokens of TP rank 0 are broadcast (one broadcast per step) so
the ranks can never diverge.

Under pipeline parallelism (one model chunk per rank, no virtual stages) every step runs the
stages in order: a stage receives the previous stage's hidden states [n, b, h] (p2p recv), runs
its layers (each stage keeps the KV cache of its own layers in its own ``StaticInferenceContext``)
and sends its output to the next stage; the last stage samples (drawing from ``generator``; the
other stages' generators are not advanced) and broadcasts the tokens, log-probs and entropies over
the pipeline group, so every rank ends with the same ``RolloutBatch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_eaopd.rollout.sampling import SamplingParams, gather_vocab_logits, sample_tokens

__all__ = ["RolloutBatch", "generate"]


@dataclass
class RolloutBatch:
    """Sampled sequences, right-padded.

    Attributes:
        tokens: [b, L] int64: prompt, response (ending with EOS when it finished), then pad.
        prompt_lens: [b] int64 tokens of each prompt.
        response_lens: [b] int64 generated tokens (EOS included).
        logprobs: [b, L] fp32: at response position t, log p(tokens[t] | tokens[:t]) under the
            untruncated softmax at the log-prob temperature; 0 elsewhere.
        entropies: [b, L] fp32: entropy (nats) of that distribution at response positions; 0 else.
        finished: [b] bool: the response ended with EOS (else it hit the token limit).
    """

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    logprobs: torch.Tensor
    entropies: torch.Tensor
    finished: torch.Tensor

    def response_mask(self) -> torch.Tensor:
        """[b, L] bool, True on response positions (EOS included)."""
        pos = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        start = self.prompt_lens.unsqueeze(1)
        return (pos >= start) & (pos < start + self.response_lens.unsqueeze(1))

    def response_ids(self, i: int) -> list[int]:
        """Token ids of response i (EOS included when it finished)."""
        start = int(self.prompt_lens[i])
        return self.tokens[i, start : start + int(self.response_lens[i])].tolist()

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Join batches along b, padding to the longest L."""
        width = max(b.tokens.shape[1] for b in batches)

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return RolloutBatch(
            tokens=torch.cat([pad(b.tokens, pad_id) for b in batches]),
            prompt_lens=torch.cat([b.prompt_lens for b in batches]),
            response_lens=torch.cat([b.response_lens for b in batches]),
            logprobs=torch.cat([pad(b.logprobs, 0.0) for b in batches]),
            entropies=torch.cat([pad(b.entropies, 0.0) for b in batches]),
            finished=torch.cat([b.finished for b in batches]),
        )


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


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    params: SamplingParams,
    generator: torch.Generator,
    use_kv_cache: bool = True,
    max_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RolloutBatch:
    """Sample one response per prompt (repeat a prompt for several samples).

    Args:
        model: a GPTModel (bare, DDP-wrapped, a one-chunk list, or a FrozenTeacher) built under
            the current megatron layout with PP = 1; its logits are [b, s, V_pad / tp].
        prompts: token ids per sequence (BOS included).
        max_new_tokens: most generated tokens per sequence (EOS included).
        eos_id, pad_id: special ids; generation of a sequence stops after EOS.
        vocab_size: real vocabulary; padded logit columns are never sampled.
        params: temperature / top-k / top-p / log-prob temperature.
        generator: CPU generator drawing one uniform per sequence and step; seed it the same on
            every rank of the TP group.
        use_kv_cache: decode with megatron's static KV cache; False re-runs the prefix each step.
        max_batch: decode at most this many sequences at once (chunks run one after another).
        progress: called with the number of sequences finished after each chunk.
    Returns:
        RolloutBatch (on every rank of the TP group).
    Collectives per decoded position: 1 TP all-gather of [b, V_pad / tp] logits and 1 TP
    broadcast of [3, b] (tokens, log-probs, entropies), besides the model's own TP all-reduces;
    under PP also 1 p2p send/recv of [n, b, h] hidden states between neighbouring stages and 1
    broadcast of [3, b] from the last stage over the pipeline group.
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            raise ValueError("rollouts under virtual pipeline parallelism are not supported")
        if getattr(_bare_module(model).config, "sequence_parallel", False):
            raise ValueError("rollouts under pipeline parallelism need sequence_parallel off")
    if not prompts:
        raise ValueError("no prompts to generate from")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    module = _bare_module(model)
    was_training = module.training
    module.eval()
    try:
        step = max_batch or len(prompts)
        out = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            out.append(
                _generate_chunk(
                    module,
                    chunk,
                    max_new_tokens,
                    eos_id,
                    pad_id,
                    vocab_size,
                    params,
                    generator,
                    use_kv_cache,
                )  # fmt: skip
            )
            if progress is not None:
                progress(len(chunk))
    finally:
        module.train(was_training)
    return out[0] if len(out) == 1 else RolloutBatch.concat(out, pad_id)


def _generate_chunk(
    module, prompts, max_new_tokens, eos_id, pad_id, vocab_size, params, generator, use_kv_cache
) -> RolloutBatch:
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_eaopd.parallel.init import compute_device

    device = compute_device()
    b = len(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if int(prompt_lens.min()) < 1:
        raise ValueError("every prompt needs at least one token (BOS)")
    max_len = getattr(module, "max_sequence_length", None) or int(1e9)
    total = min(int(prompt_lens.max()) + max_new_tokens, max_len)
    if int(prompt_lens.max()) >= total:
        raise ValueError(f"a prompt of {int(prompt_lens.max())} tokens leaves no room to generate")
    tokens = torch.full((b, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    limit = torch.clamp(prompt_lens + max_new_tokens, max=total)  # exclusive end per sequence
    logprobs = torch.zeros(b, total)
    entropies = torch.zeros(b, total)
    finished = torch.zeros(b, dtype=torch.bool)
    response_lens = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    dev_tokens = tokens.to(device)
    positions = torch.arange(total, device=device).unsqueeze(0).expand(b, total)
    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    src = ps.get_tensor_model_parallel_src_rank()

    pp = ps.get_pipeline_model_parallel_world_size()
    first = pp == 1 or ps.is_pipeline_first_stage(ignore_virtual=True)
    last = pp == 1 or ps.is_pipeline_last_stage(ignore_virtual=True)

    context = StaticInferenceContext(b, total) if use_kv_cache else None
    cached = 0

    def run_stage(start: int, end: int, **kw):
        """This stage's forward of positions [start, end); the last stage returns its logits."""
        if not first:
            hidden = torch.empty(
                end - start, b, module.config.hidden_size, dtype=module.config.params_dtype,
                device=device,
            )  # fmt: skip
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            module.set_input_tensor(hidden)
        out = module(dev_tokens[:, start:end], positions[:, start:end], None, **kw)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return out

    def next_logits(t: int) -> torch.Tensor | None:  # full-vocab logits predicting position t
        nonlocal cached
        if context is None:
            out = run_stage(0, t)  # [b, t, V_pad / tp] on the last stage
            return None if out is None else gather_vocab_logits(out[:, -1, :], vocab_size, tp_group)
        context.sequence_len_offset = cached
        if cached > 0:
            context.enable_decode_mode()
        # megatron's inference mode gathers the vocabulary itself: [b, 1, V_pad]
        out = run_stage(cached, t, inference_context=context, runtime_gather_output=True)
        cached = t
        return None if out is None else out[:, -1, :vocab_size].float()

    t = int(prompt_lens.min())
    while t < total:
        full = next_logits(t)  # [b, V] on the last stage
        packed = torch.zeros(3, b, dtype=torch.float64, device=device)
        if last:
            new, lp, ent = sample_tokens(full, params, generator)
            packed = torch.stack([new.double(), lp.double(), ent.double()]).to(device)
            if tp > 1:
                dist.broadcast(packed, src=src, group=tp_group)
        if pp > 1:
            src_pp = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(packed, src=src_pp, group=ps.get_pipeline_model_parallel_group())
        new, lp, ent = packed[0].long().cpu(), packed[1].float().cpu(), packed[2].float().cpu()
        generating = (t >= prompt_lens) & ~done & (t < limit)
        tokens[:, t] = torch.where(generating, new, tokens[:, t])
        logprobs[:, t] = torch.where(generating, lp, 0.0)
        entropies[:, t] = torch.where(generating, ent, 0.0)
        response_lens += generating.long()
        hit_eos = generating & (new == eos_id)
        finished |= hit_eos
        done |= hit_eos | (t + 1 >= limit)
        dev_tokens[:, t] = tokens[:, t].to(device)
        t += 1
        if bool(done.all()):
            break
    pos = torch.arange(total).unsqueeze(0)
    mask = (pos >= prompt_lens.unsqueeze(1)) & (pos < (prompt_lens + response_lens).unsqueeze(1))
    tokens = torch.where(mask | (pos < prompt_lens.unsqueeze(1)), tokens, pad_id)
    width = int((prompt_lens + response_lens).max())
    return RolloutBatch(
        tokens=tokens[:, :width].contiguous(),
        prompt_lens=prompt_lens,
        response_lens=response_lens,
        logprobs=torch.where(mask, logprobs, 0.0)[:, :width].contiguous(),
        entropies=torch.where(mask, entropies, 0.0)[:, :width].contiguous(),
        finished=finished,
    )
