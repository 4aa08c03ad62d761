"""The trainer end to end with data-parallel students, at 2, 4 and 8 gloo ranks.

Rollouts, teacher scoring at a different teacher layout, updates, evaluation, checkpoints and
resume, with prompt counts that do not divide over the replicas (6 prompts per iteration in
mini-batches of 3: at DP 4 one replica is idle in every step) and an odd evaluation set (7
prompts). The 8-rank run (TP 2 x PP 2 x DP 2 for both models, the shipped qwen3 configs' layout
on 8 GPUs, with full activation recomputation) is resumed at TP 1 x DP 4 without it and
continued: the weights loaded at the new layout equal those saved at the old one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers
from tests.trainer.common import CONFIG

RUN = [
    "training.iterations=2",
    "training.eval_interval=1",
    "training.checkpoint_interval=1",
    "rollout.prompts_per_iteration=6",
    "rollout.mini_batch_size=3",
    "rollout.micro_batch_size=2",
    "rollout.samples_per_prompt=1",
    "optimizer.warmup_iterations=2",  # at most the 8-rank run's 1 x 2 optimizer steps
    "rollout.max_response_tokens=16",
    "eval.max_prompts=7",
    "eval.k=2",
    "eval.max_response_tokens=16",
    "teacher_prep.iterations=3",
    "teacher_prep.batch_size=8",
    "student_prep.iterations=2",
    "student_prep.batch_size=8",
    "task.synthetic.num_train=48",
    "task.synthetic.num_distill=24",
    "task.synthetic.num_eval=9",
    "logging.progress_bars=false",
    "logging.console=false",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Tokenizer and prepared-model caches shared by the DP 2 and DP 4 runs (their keys do not
    depend on the layout): the first trains the teacher and the student warm start, the other
    loads them at its own layout. The 8-rank run prepares its own at TP 2 x PP 2 x DP 2."""
    return str(tmp_path_factory.mktemp("dp-caches"))


def _cfg(tmp, name, layout, extra=(), caches=None):
    from megatron_eaopd.config import load_config

    caches = caches or tmp

    (stp, spp), (ttp, tpp) = layout
    return load_config(
        CONFIG,
        RUN
        + [
            f"parallel.student.tp={stp}", f"parallel.student.pp={spp}",
            f"parallel.teacher.tp={ttp}", f"parallel.teacher.pp={tpp}",
            f"training.output_dir={tmp}/{name}",
            f"teacher_prep.cache_dir={caches}/teachers",
            f"student_prep.cache_dir={caches}/students",
            f"tokenizer.cache_dir={caches}/tokenizers",
            *extra,
        ],
    )  # fmt: skip


def _train_worker(rank, world, cfg):
    from megatron_eaopd.parallel.init import destroy_parallel, use_layout
    from megatron_eaopd.rollout.decode_graphs import DecodeGraphs
    from megatron_eaopd.trainer import Trainer, checks

    static_steps = [0]
    if cfg.rollout.cuda_graphs:  # on the CPU: the static-shape steps run eagerly, counted
        checks._cuda_available = lambda: True
        step = DecodeGraphs.__call__

        def counted(self, *a, **kw):
            static_steps[0] += 1
            return step(self, *a, **kw)

        DecodeGraphs.__call__ = counted
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        with use_layout("student"):
            start = helpers.global_pieces(trainer.student.chunks)
        recompute = trainer.student.chunks[0].config.recompute_granularity
        summary = trainer.run()
        with use_layout("student"):
            end = helpers.global_pieces(trainer.student.chunks)
    finally:
        trainer.close()
        destroy_parallel()
    shapes = [tuple(mb["tokens"].shape) for mb in trainer.last_micro_batches]
    return {"summary": summary, "start": start, "end": end, "from": trainer.start_iteration,
            "static_steps": static_steps[0], "shapes": shapes, "recompute": recompute}  # fmt: skip


def _records(path, split):
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _check_samples(out_dir, evals, saved):
    """The saved evaluation samples: the first ``saved`` of the 7 prompts in order, 2 responses
    each, the verifier's verdict on each text, a reason exactly for the wrong ones; when every
    prompt is saved their mean correctness is the logged Avg@2."""
    from megatron_eaopd.data.countdown import _PROMPT_RE, verify_countdown

    for row in evals:
        path = f"{out_dir}/eval_samples/student_iter_{row['iteration']:07d}.jsonl"
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert [r["index"] for r in records] == list(range(saved)), path
        right = []
        for r in records:
            assert len(r["responses"]) == 2
            start, sizes = _PROMPT_RE.fullmatch(r["prompt"]).groups()
            sizes = [int(x) for x in sizes.split(",")]
            for response in r["responses"]:
                ok = verify_countdown(int(start), sizes, response["text"])
                assert response["correct"] == ok and (response["why"] is None) == ok, response
                right.append(ok)
        if saved == 7:
            assert abs(sum(right) / len(right) - row["mean/avg@2"]) < 1e-3


def _check_run(out_dir, iterations):
    train = _records(f"{out_dir}/metrics.jsonl", "train")
    assert [r["iteration"] for r in train] == list(range(1, iterations + 1))
    for row in train:
        for key in ("loss", "fkl", "pg_loss", "grad_norm", "reward", "response_length"):
            assert math.isfinite(row[key]), key
        assert row["skipped_updates"] == 0
    evals = _records(f"{out_dir}/metrics.jsonl", "eval")
    assert [r["iteration"] for r in evals] == list(range(0, iterations + 1))
    for row in evals:
        assert 0 <= row["mean/avg@2"] <= row["mean/pass@2"] <= 1
        assert 0 <= row["student_high_frac"] <= 1
        # fkl_high is a mean over the teacher's high-entropy tokens: null without any
        assert (row["fkl_high"] is None) == (row["teacher_high_frac"] == 0)
        assert row["fkl_high"] is None or row["fkl_high"] >= 0
        assert 1 <= row["response_length"] <= 16
    return train, evals


def _run(world, cfg):
    results = run_distributed(_train_worker, world, cfg, timeout=900)
    assert all(r["summary"]["iteration"] == cfg.training.iterations for r in results)
    return results


@pytest.mark.parametrize(
    "world, layout",
    [
        (2, ((1, 1), (1, 1))),  # TP 1 x DP 2 for both (the layout of the crash)
        # student TP 1 x DP 4, teacher TP 2 x PP 2 (19 s with the preloading fork server)
        (4, ((1, 1), (2, 2))),
    ],
    ids=["dp2", "dp4-teacher-tp2pp2"],
)
def test_trainer_with_data_parallel_student(tmp_path, caches, world, layout):
    # DP 2 also decodes at static shapes (rollout.cuda_graphs; on the CPU its static-shape
    # steps run eagerly, the CUDA check pretended): rollouts and evaluations go through them;
    # and its micro-batches hold at most 32 positions (the longest row: 16 prompt + 16
    # response tokens), so the replica with 2 rows per step (of 17 or more tokens) splits them
    budget = 32
    extra = (
        ["rollout.cuda_graphs=true", f"rollout.micro_batch_tokens={budget}"] if world == 2 else []
    )
    cfg = _cfg(str(tmp_path), "run", layout, extra, caches)
    results = _run(world, cfg)
    assert all((r["static_steps"] > 0) == (world == 2) for r in results), results
    if world == 2:
        for r in results:
            assert r["shapes"] and all(b * s <= budget for b, s in r["shapes"]), r["shapes"]
    _, evals = _check_run(f"{tmp_path}/run", 2)
    _check_samples(f"{tmp_path}/run", evals, 7)  # eval.save_samples: 16 by default


def test_trainer_tp2_pp2_dp2_on_8_ranks_then_resumed_at_tp1_dp4(tmp_path):
    """The shipped 8-GPU configs' layout (TP 2 x PP 2 x DP 2; ~50 s on 2 cores), with full
    activation recomputation (what a 40 GB card needs), resumed without it (free to change)."""
    tmp = str(tmp_path)
    # one iteration at 8 ranks (evaluated before and after it), the second after the resume
    extra = ["eval.save_samples=3", "training.iterations=1", "training.recompute=full"]
    first = _run(8, _cfg(tmp, "run", ((2, 2), (2, 2)), extra))
    assert all(r["recompute"] == "full" for r in first)
    _, evals = _check_run(f"{tmp}/run", 1)
    _check_samples(f"{tmp}/run", evals, 3)
    assert (tmp_path / "run" / "eval_samples" / "teacher_iter_0000000.jsonl").is_file()
    saved = helpers.assemble([r["end"] for r in first])

    cfg = _cfg(tmp, "run", ((1, 1), (2, 1)))
    second = _run(4, cfg)
    assert all(r["from"] == 1 and r["recompute"] is None for r in second)
    loaded = helpers.assemble([r["start"] for r in second])
    assert set(loaded) == set(saved)
    for key, value in saved.items():  # the vocabulary is padded per TP size: compare real rows
        rows = min(value.shape[0], loaded[key].shape[0])
        bad = (loaded[key][:rows] != value[:rows]).reshape(rows, -1).any(-1).nonzero().flatten()
        assert bad.numel() == 0, f"{key} {tuple(value.shape)} {tuple(loaded[key].shape)} {bad}"
    _check_run(f"{tmp}/run", 2)
    after = helpers.assemble([r["end"] for r in second])
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # it kept training
