"""Vocabulary shards: which global columns a TP rank holds, and which of them are real.

Megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by * tp` and splits the
padded vocabulary evenly: rank r holds global columns [r * V_pad / tp, (r + 1) * V_pad / tp).
Columns at or beyond the true `vocab_size` are padding; they may hold finite values (the output
layer has weights for them) and must count as absent in every softmax statistic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VocabShard:
    """The slice of the vocabulary one TP rank holds.

    Attributes:
        start: first global column id held by this rank.
        width: number of columns in the local shard (V_pad / tp).
        valid: number of leading local columns that are real vocabulary (0 <= valid <= width).
        vocab_size: the true vocabulary size.
    """

    start: int
    width: int
    valid: int
    vocab_size: int

    @property
    def padded(self) -> bool:
        return self.valid < self.width


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding rule: round `vocab_size` up to a multiple of divisible_by * tp_size."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def vocab_shard(width: int, rank: int, tp_size: int, vocab_size: int | None) -> VocabShard:
    """Describe rank `rank`'s shard of `width` columns; `vocab_size=None` means no padding.

    Raises ValueError when `vocab_size` does not fit the shards (larger than width * tp_size).
    A small vocabulary padded to a multiple of 128 * tp can leave whole ranks with only padding
    (valid == 0); the losses handle that.
    """
    if width <= 0:
        raise ValueError(f"vocab shard width must be positive, got {width}")
    total = width * tp_size
    if vocab_size is None:
        vocab_size = total
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > total:
        raise ValueError(
            f"vocab_size={vocab_size} does not fit the shards: {tp_size} rank(s) x {width} "
            f"columns = {total} columns. Pass the true (unpadded) vocabulary size, and logits of "
            f"shape [s, b, V_pad / tp] with V_pad >= vocab_size."
        )
    start = rank * width
    valid = max(0, min(width, vocab_size - start))
    return VocabShard(start=start, width=width, valid=valid, vocab_size=vocab_size)
