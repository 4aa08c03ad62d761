"""Token-sequence conventions shared by teacher preparation, rollouts and evaluation.

A prompt is encoded as ``[BOS] + encode(prompt)`` (no BOS when the tokenizer has none, as Qwen's);
a response continues it and ends with EOS. A supervised example is the prompt followed by
``encode(solution) + [EOS]``, with the loss on the solution and the EOS only. Works with the
project's :class:`~megatron_eaopd.data.tokenizer.Tokenizer` and with Hugging Face tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "bos_id",
    "build_sft_example",
    "chat_turn_end_id",
    "encode_prompt",
    "encode_text",
    "eos_id",
    "pad_sequences",
    "stop_token_ids",
    "use_chat_template",
]

#: Attribute set on a Hugging Face tokenizer by :func:`use_chat_template`.
CHAT_ATTR = "eaopd_chat_template_kwargs"
#: Attribute set on a Hugging Face tokenizer by ``data.tokenizer.build_tokenizer``: the
#: ``eos_token_id`` list of its folder's generation_config.json.
STOP_ATTR = "eaopd_generation_eos_ids"
#: Attribute set by :func:`use_chat_template`: the template's end-of-turn id (or None).
TURN_END_ATTR = "eaopd_chat_turn_end_id"


def use_chat_template(tokenizer: Any, enable_thinking: bool | None = None) -> None:
    """Make :func:`encode_prompt` wrap prompts in the tokenizer's chat template: one user turn,
    then the assistant's generation prompt (``enable_thinking`` is passed to the template when
    not None: Qwen3's non-thinking mode is False), and end responses also at the template's
    end-of-turn token (:func:`stop_token_ids`). ValueError when the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(
        tokenizer, "apply_chat_template"
    ):
        raise ValueError(
            "tokenizer.chat_template=true, but the tokenizer has no chat template: use a "
            "Hugging Face tokenizer folder whose tokenizer_config.json defines chat_template"
        )
    kwargs = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
    setattr(tokenizer, CHAT_ATTR, kwargs)
    setattr(tokenizer, TURN_END_ATTR, chat_turn_end_id(tokenizer, kwargs))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    if hasattr(tokenizer, "sp"):  # the project's sentencepiece Tokenizer
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


def bos_id(tokenizer: Any) -> int | None:
    """The beginning-of-sequence id (``bos_id`` or ``bos_token_id``), or None without one."""
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None or bos < 0 else int(bos)


def eos_id(tokenizer: Any) -> int:
    """The end-of-sequence id: ``eos_id`` or Hugging Face's ``eos_token_id``; for a tokenizer
    without one, the first id of its folder's ``generation_config.json`` ``eos_token_id``.
    ValueError when there is none of these."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or eos < 0:
        stops = getattr(tokenizer, STOP_ATTR, ())
        if stops:
            return int(stops[0])
        raise ValueError(
            "the tokenizer has no EOS token: set eos_token in its folder's "
            "tokenizer_config.json, or eos_token_id in its generation_config.json"
        )
    return int(eos)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a response: :func:`eos_id` first, then those of the tokenizer folder's
    ``generation_config.json`` (``eos_token_id``, an int or a list: Qwen3 instruct models stop on
    ``<|im_end|>`` and ``<|endoftext|>``), then, with :func:`use_chat_template`, the template's
    end-of-turn token (a base model's folder may list only ``<|endoftext|>``), each once."""
    ids = [eos_id(tokenizer)]
    for i in (*getattr(tokenizer, STOP_ATTR, ()), getattr(tokenizer, TURN_END_ATTR, None)):
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def chat_turn_end_id(tokenizer: Any, chat_kwargs: dict | None = None) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template (Qwen's
    and ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), or None when the template puts no
    special token right after the assistant's text. Found by rendering a user and an assistant
    turn and encoding what follows the assistant's text."""
    marker = "eaopd_turn_text"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **(chat_kwargs or {}))
    except Exception:  # noqa: BLE001 - a template that cannot render a turn: nothing to add
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    rest = text[text.rindex(marker) + len(marker) :].lstrip(" ")
    ids = list(tokenizer.encode(rest, add_special_tokens=False)) if rest else []
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return int(ids[0]) if ids and ids[0] in special else None


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """``[BOS] + encode(prompt)`` (without BOS when the tokenizer has none), or with
    :func:`use_chat_template` the chat template's ids of one user turn and the generation prompt
    (the template adds whatever special tokens it defines)."""
    chat = getattr(tokenizer, CHAT_ATTR, None)
    if chat is not None:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, **chat
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers: BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    bos = bos_id(tokenizer)
    return ([bos] if bos is not None else []) + encode_text(tokenizer, prompt)


def build_sft_example(
    tokenizer: Any, prompt: str, solution: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on solution and EOS tokens) of one supervised example.

    Raises:
        ValueError: when the example is longer than ``max_len`` tokens.
    """
    p = encode_prompt(tokenizer, prompt)
    r = encode_text(tokenizer, solution) + [eos_id(tokenizer)]
    if len(p) + len(r) > max_len:
        raise ValueError(
            f"example of {len(p) + len(r)} tokens ({len(p)} prompt) exceeds max_len={max_len}"
        )
    return p + r, [0] * len(p) + [1] * len(r)


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``[b, length]`` (default: the longest); returns ``(tokens, lengths)``."""
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length={length}")
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, torch.tensor([len(s) for s in seqs], dtype=torch.long)
