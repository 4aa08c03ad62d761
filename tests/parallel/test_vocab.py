"""Vocabulary shard arithmetic against a brute-force enumeration of columns."""

import pytest

from megatron_eaopd.parallel.vocab import padded_vocab_size, vocab_shard


@pytest.mark.parametrize("vocab, tp", [(32003, 1), (32003, 2), (32003, 4), (151936, 2), (320, 4)])
def test_shards_cover_exactly_the_real_vocabulary(vocab, tp):
    v_pad = padded_vocab_size(vocab, tp)
    assert v_pad % (128 * tp) == 0 and vocab <= v_pad < vocab + 128 * tp
    width = v_pad // tp
    real = []
    for rank in range(tp):
        sh = vocab_shard(width, rank, tp, vocab)
        assert sh.start == rank * width and sh.width == width and 0 <= sh.valid <= width
        real += [sh.start + c for c in range(sh.valid)]
    assert real == list(range(vocab))  # every real column once, no padding column


def test_bad_vocab_sizes_name_the_problem():
    with pytest.raises(ValueError, match="does not fit"):
        vocab_shard(100, 0, 2, 201)
    assert vocab_shard(100, 3, 4, 300).valid == 0  # a rank of padding only
    with pytest.raises(ValueError, match="positive"):
        vocab_shard(100, 0, 1, 0)
    assert vocab_shard(100, 1, 2, None).valid == 100
