"""Process groups, vocabulary shard ranges and collective helpers."""

from megatron_eaopd.parallel.groups import (
    all_gather_rows,
    resolve_tp_group,
    tp_rank_and_size,
)
from megatron_eaopd.parallel.vocab import VocabShard, padded_vocab_size, vocab_shard

__all__ = [
    "VocabShard",
    "all_gather_rows",
    "padded_vocab_size",
    "resolve_tp_group",
    "tp_rank_and_size",
    "vocab_shard",
]
