"""The trainer with a pipeline-parallel student (student PP 2 x TP 1 on 2 processes; TP 2 x PP 2 on
4 processes as a slow test; teacher TP 2; gloo): rollouts through the pipeline, the warm start,
updates, evaluation and checkpoints all run, and the metrics are finite."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.dist import run_distributed
from tests.trainer.common import CONFIG, TINY_RUN

TINY = [
    "parallel.student.pp=2",
    "rollout.prompts_per_iteration=8",
    "rollout.mini_batch_size=4",
    "rollout.micro_batch_size=2",
    "student_prep.iterations=3",
    "student_prep.batch_size=8",
] + TINY_RUN


def _worker(rank, world, tmp, tp):
    from megatron_eaopd.cli import run
    from megatron_eaopd.config import load_config

    cfg = load_config(
        CONFIG,
        TINY
        + [
            f"parallel.student.tp={tp}",
            f"rollout.pp_interleave={'true' if tp == 2 else 'false'}",  # both paths
            # TP 2 x PP 2 also fills micro-batches to a token budget (3 rows at the 40-token
            # limit, up to 4 shorter ones): the schedule sends shapes whose rows differ
            *(["rollout.micro_batch_tokens=120", "rollout.micro_batch_size=4"] if tp == 2 else []),
            f"training.output_dir={tmp}/run",
            f"teacher_prep.cache_dir={tmp}/teachers",
            f"student_prep.cache_dir={tmp}/students",
            f"tokenizer.cache_dir={tmp}/tokenizers",
        ],
    )
    # rollouts and evaluation decode with FastDecoder on both stages (no fallback, no stage
    # without it): count its forwards, keep the warnings that a fallback would give
    import importlib
    import warnings

    G = importlib.import_module("megatron_eaopd.rollout.generate")  # the module, not the function
    from megatron_eaopd.rollout.fast_decode import FastDecoder

    original, calls = FastDecoder.forward, [0]
    interleave, chunks = G.run_interleaved, [0]

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    def counted_chunks(*args, **kwargs):
        chunks[0] += 1
        return interleave(*args, **kwargs)

    FastDecoder.forward, G.run_interleaved = counted, counted_chunks
    loop = importlib.import_module("megatron_eaopd.trainer.loop")
    distill, shapes = loop.distill_on_rollouts, []

    def recorded(*args, **kwargs):  # the micro-batches' shapes of every iteration
        done = distill(*args, **kwargs)
        shapes.append([tuple(mb["tokens"].shape) for mb in done["micro"]])
        return done

    loop.distill_on_rollouts = recorded
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run(cfg)
    finally:
        FastDecoder.forward, G.run_interleaved = original, interleave
        loop.distill_on_rollouts = distill
    fallbacks = [str(w.message) for w in caught if "megatron's forward" in str(w.message)]
    return dict(summary, fast_forwards=calls[0], fallbacks=fallbacks, interleaved=chunks[0],
                shapes=shapes)  # fmt: skip


# TP 1 x PP 2 with -m slow (13 s on 2 cores): TP 2 x PP 2 runs the same pipeline paths, and
# tests/rollout/test_generate.py decodes at PP 2 without TP
@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2],
                         ids=["tp1-pp2", "tp2-pp2"])  # fmt: skip
def test_trainer_with_pipeline_parallel_student(tmp_path, tp):
    tmp = str(tmp_path)
    summaries = run_distributed(_worker, 2 * tp, tmp, tp, timeout=600)
    assert all(s["iteration"] == 2 and not s["stopped_early"] for s in summaries)
    assert all(s["fast_forwards"] > 0 and not s["fallbacks"] for s in summaries), [
        (s["fast_forwards"], s["fallbacks"]) for s in summaries
    ]
    # rollout.pp_interleave reaches the rollouts and the evaluation (on at TP 2 x PP 2 here)
    assert all((s["interleaved"] > 0) == (tp == 2) for s in summaries), summaries
    if tp == 2:  # rollout.micro_batch_tokens: every micro-batch within 120 positions
        shapes = [shape for it in summaries[0]["shapes"] for shape in it]
        assert len(summaries[0]["shapes"]) == 2 and shapes, summaries[0]["shapes"]
        assert all(b * s <= 120 and b <= 4 for b, s in shapes), shapes
        assert len({b for b, _ in shapes}) > 1, shapes  # row counts differ
    # both stages hold the same (reduced) metrics
    same = [
        {k: v for k, v in s["train"].items() if not k.startswith("time_") and k != "tokens_per_s"}
        for s in summaries
    ]
    assert all(other == same[0] for other in same[1:])
    with open(f"{tmp}/run/metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [row for row in rows if row["split"] == "train"]
    assert [row["iteration"] for row in train] == [1, 2]
    for row in train:
        for key in ("loss", "pg_loss", "fkl", "gate", "teacher_entropy", "student_entropy",
                    "grad_norm", "reward", "response_length", "tokens_per_s"):  # fmt: skip
            assert math.isfinite(row[key]), key
        assert row["skipped_updates"] == 0 and row["grad_norm"] > 0
        assert 1 <= row["response_length"] <= 24
    assert train[0]["loss"] != train[1]["loss"]
    evals = [row for row in rows if row["split"] == "eval"]
    assert [row["iteration"] for row in evals] == [0, 2]
    for row in evals:
        assert 0 <= row["mean/avg@2"] <= row["mean/pass@2"] <= 1
        assert 0 <= row["student_high_frac"] <= 1
        # fkl_high is a mean over the teacher's high-entropy tokens: null without any
        assert (row["fkl_high"] is None) == (row["teacher_high_frac"] == 0)
        assert row["fkl_high"] is None or row["fkl_high"] >= 0
    assert os.path.isfile(f"{tmp}/run/checkpoints/latest")
