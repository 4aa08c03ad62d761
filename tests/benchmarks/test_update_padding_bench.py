"""benchmarks/bench_update_padding.py at a tiny shape: the three variants run through the trainer's
update at PP 1 and PP 2 (student and teacher) and compute the same gradients; cutting each
micro-batch to its own longest row runs fewer positions than padding all to the longest, and the
token budget keeps every micro-batch within it in fewer micro-batches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from tests.dist import run_distributed

BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")
ARGS = dict(rows=8, steps=2, micro=2, prompt=4, mean_response=6, max_response=24, layers=2,
            teacher_layers=2, hidden=64, heads=4, vocab=512, reps=1, budget=0,
            budget_rows=0)  # fmt: skip


def _worker(rank, world, student, teacher):
    sys.path.insert(0, BENCH)
    import bench_update_padding as B

    return B.measure(argparse.Namespace(**ARGS), student, teacher)


@pytest.mark.parametrize("layout", [((1, 1), (1, 1)), ((1, 2), (1, 2))])
def test_cut_micro_batches_run_fewer_positions_for_the_same_gradients(layout):
    student, teacher = layout
    res = run_distributed(_worker, student[0] * student[1], student, teacher, timeout=300)[0]
    cut, budget, padded = (res["best"][v] for v in ("cut", "budget", "padded"))
    assert padded["positions"] == res["rows"] * res["longest"]
    assert res["tokens"] <= cut["positions"] < padded["positions"]
    # the budget: 2 rows of 4 + 24 positions, and at most the 4 rows of a step
    assert all(b * s <= 56 and b <= 4 for b, s in budget["shapes"]), budget["shapes"]
    assert budget["micro"] < cut["micro"] and budget["positions"] < padded["positions"]
    assert max(res["diff"].values()) < 1e-5
    assert min(r[k] for r in (cut, budget, padded) for k in ("teacher", "update")) > 0
