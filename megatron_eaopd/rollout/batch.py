"""The result of ``generate``: sampled sequences with their log-probs and entropies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["RolloutBatch", "rollout_result", "stop_ids"]


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


def rollout_result(dec, pad_id: int) -> RolloutBatch:
    """The RolloutBatch of a finished decoder (``_Decoder`` or ``ContinuousDecoder``)."""
    prompt_lens, response_lens, total = dec.prompt_lens, dec.response_lens, dec.total
    pos = torch.arange(total).unsqueeze(0)
    start = prompt_lens.unsqueeze(1)
    mask = (pos >= start) & (pos < (prompt_lens + response_lens).unsqueeze(1))
    tokens = torch.where(mask | (pos < start), dec.tokens, pad_id)
    width = int((prompt_lens + response_lens).max())
    return RolloutBatch(
        tokens=tokens[:, :width].contiguous(),
        prompt_lens=prompt_lens,
        response_lens=response_lens,
        logprobs=torch.where(mask, dec.logprobs, 0.0)[:, :width].contiguous(),
        entropies=torch.where(mask, dec.entropies, 0.0)[:, :width].contiguous(),
        finished=dec.finished,
    )


def stop_ids(eos_id: int | Sequence[int], vocab_size: int) -> torch.Tensor:
    """The ids that end a response, as a CPU int64 tensor [n] (``generate``'s ``eos_id``: one id,
    or several, as Hugging Face's ``generation_config.json`` lists: Qwen3's ``[151645, 151643]``).
    A negative id never matches (no stop). ValueError for an empty list, a non-integer, or an id
    at or above ``vocab_size`` (never sampled, so the responses would never end)."""
    import operator

    values = eos_id.tolist() if isinstance(eos_id, torch.Tensor) else eos_id  # 0-d: an int
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]
    values = list(values)
    # ints, numpy integers, 0-d tensors (anything with __index__); not bools, floats, strings
    if not values or any(isinstance(i, bool) or not hasattr(i, "__index__") for i in values):
        raise ValueError(f"eos_id must be an id or a non-empty list of ids, got {eos_id!r}")
    ids = [operator.index(i) for i in values]
    high = [i for i in ids if i >= vocab_size]
    if high:
        raise ValueError(
            f"stop id(s) {high} are outside the vocabulary of {vocab_size}: they are never "
            "sampled, so responses would not end before max_new_tokens"
        )
    return torch.tensor(sorted(set(ids)), dtype=torch.long)
