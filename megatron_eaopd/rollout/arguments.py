"""Checks of ``rollout.generate``'s arguments, made before any decoding.

``check_call`` refuses what would otherwise crash deep inside the model (an id outside the
embedding: ``IndexError`` at TP 1) or be embedded silently (at TP > 1 a vocab-parallel embedding
gives an out-of-shard id a zero vector): prompt ids and ``pad_id`` outside ``[0, vocab_size)``,
non-integer lengths, prompts that are not a list of id lists. ``check_agreement`` compares a
small fingerprint of the call over the model-parallel group (TP x PP ranks of one data-parallel
replica), which must pass identical arguments: a mismatch used to abort the process in a
collective with a size mismatch, or to return tokens of neither rank's seed.
"""

from __future__ import annotations

import zlib
from array import array

import torch

__all__ = ["check_agreement", "check_call"]


def check_call(prompts, max_new_tokens, pad_id, vocab_size) -> list[list[int]]:
    """The prompts as lists of ints (a [n, s] integer tensor is accepted), after refusing bad
    arguments with a ValueError that names them. No communication."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError(
                f"prompts as a tensor must be [n, s] integer ids, got {tuple(prompts.shape)} "
                f"{prompts.dtype}; pass a list of id lists for prompts of different lengths"
            )
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token id lists, got {type(prompts).__name__}")
    prompts = [list(p) for p in prompts]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise ValueError(
            f"pad_id={pad_id!r} must be an int in [0, vocab_size={vocab_size}): finished rows "
            "feed it to the model until they leave the batch (any real token id serves, e.g. "
            "the EOS id)"
        )
    for i, prompt in enumerate(prompts):
        try:  # C speed; text or float ids raised a TypeError from deep inside
            array("q", prompt)
        except (TypeError, OverflowError):
            raise ValueError(f"prompt {i} holds {_rejected(prompt)}") from None
        if prompt and (min(prompt) < 0 or max(prompt) >= vocab_size):
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise ValueError(
                f"prompt {i} holds token id {bad} outside [0, vocab_size={vocab_size})"
            )
    return prompts


def _rejected(prompt) -> str:
    """What is wrong with the first id of ``prompt`` that an int64 array refuses."""
    for x in prompt:
        try:
            array("q", [x])
        except OverflowError:
            return f"{x!r}, outside the int64 range of token ids"
        except TypeError:
            return f"{x!r}, not an integer token id: pass token ids (encode text first)"
    return "an id an int64 array refuses"


def fingerprint(prompts, max_new_tokens, eos_ids, pad_id, params, generator, options=()) -> int:
    """A 32-bit CRC of everything a call's tokens depend on that every rank must share, and of
    ``options``: the decode settings that shape the collectives (batch size, KV cache,
    compaction, continuous batching, ...), which must agree even where the tokens do not
    depend on them."""
    crc = zlib.crc32(repr((len(prompts), max_new_tokens, sorted(eos_ids), pad_id, params,
                           tuple(options))).encode())  # fmt: skip
    crc = zlib.crc32(generator.get_state().numpy().tobytes(), crc)
    for prompt in prompts:
        crc = zlib.crc32(array("q", [len(prompt), *prompt]).tobytes(), crc)
    return crc


def check_agreement(prompts, max_new_tokens, eos_ids, pad_id, params, generator, device,
                    options=()) -> None:  # fmt: skip
    """ValueError on every rank of the model-parallel group when its ranks' calls differ
    (prompts, lengths, settings, the generator's state, the decode ``options``: a rank with
    another ``max_batch`` or KV-cache setting aborted or hung in a collective). Collectives:
    one all-gather of one int64 per rank over the model-parallel group (none when it has one
    rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.groups import all_gather_rows

    if not dist.is_initialized():
        return
    mine = torch.tensor(
        [fingerprint(prompts, max_new_tokens, eos_ids, pad_id, params, generator, options)],
        dtype=torch.int64, device=device,
    )  # fmt: skip
    values = all_gather_rows(mine, ps.get_model_parallel_group()).view(-1).tolist()
    if len(set(values)) > 1:
        raise ValueError(
            "generate: the tensor- and pipeline-parallel ranks of one data-parallel replica "
            "were called with different arguments (prompts, max_new_tokens, stop or pad ids, "
            "sampling settings, decode options such as max_batch, use_kv_cache or "
            "compact_frac, or the generator's state: seed it the same on every rank); "
            f"call fingerprints by rank of the group: {values}"
        )
