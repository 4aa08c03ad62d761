"""Per-step work of the decode loop does not grow with the batch or the vocabulary (issue 11):
the torch calls per decode step (benchmarks/count_decode_ops.py) are the same at two batch
sizes and two vocabularies, and at two stretches of positions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.dist import run_distributed

BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")


def _worker(rank, world):
    sys.path.insert(0, BENCH)
    import count_decode_ops as C

    out = {}
    for dtype in ("float32", "bfloat16"):  # bf16: the path a bf16 GPU model takes (norm modules)
        for batch, vocab in ((3, 512), (7, 1024)):
            args = argparse.Namespace(batch=batch, prompt=5, layers=2, hidden=64, heads=4,
                                      vocab=vocab, params_dtype=dtype)  # fmt: skip
            out[dtype, batch, vocab] = C.per_step(args, (4, 8))
            out[dtype, batch, vocab, "later"] = C.per_step(args, (8, 12))
    return out


def test_torch_calls_per_decode_step_do_not_grow_with_batch_vocab_or_position():
    (out,) = run_distributed(_worker, 1)
    for dtype in ("float32", "bfloat16"):
        small = out[dtype, 3, 512]
        assert sum(small.values()) > 50  # the counter sees the model and the sampler
        assert any("(fast_decode.py)" in k for k in small)  # FastDecoder decoded, both dtypes
        assert any("(vocab_parallel.py)" in k for k in small)
        for key, rows in out.items():
            if key[0] != dtype:
                continue
            assert rows == small, (key, {k: (rows.get(k), small.get(k))
                                         for k in set(rows) | set(small)
                                         if rows.get(k) != small.get(k)})  # fmt: skip
