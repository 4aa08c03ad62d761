"""Activation recomputation (``training.recompute``) on CPU over gloo.

Against the same student without it (the independent path: megatron's plain forward and
backward): two distillation steps on fixed rollouts through the trainer's update path
(``distill_on_rollouts``: teacher scoring, the EOPD loss fused with the output layer, Adam) move
the weights identically with ``full`` and ``selective`` recompute, at TP 1 x PP 2 and (slow)
TP 2 x PP 2. The recompute must really run: megatron's checkpoint function is counted, once
per layer and micro-batch for ``full`` (a layer's forward run again in backward), once per layer
and micro-batch for ``selective`` (the core attention), never without. Its memory saving is
measured in tests/plan/test_plan.py. Then the trainer end to end with ``training.recompute``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers
from tests.trainer.common import CONFIG, TINY_RUN, one_iteration

SEED, K, ROWS, MICRO = 11, 4, 6, 3


def _rollouts(vocab: int):
    """ROWS rows, prompts of 2-5 tokens, responses of 1-8 tokens."""
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(2, 6, (ROWS,), generator=gen)
    response = torch.randint(1, 9, (ROWS,), generator=gen)
    return random_rollouts(prompt, response, vocab, gen)


def step_worker(rank, world, tp, pp):
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.models import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts, use_layout
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import distill_on_rollouts

    calls = [0]
    backward = mrandom.CheckpointFunction.backward

    def counted(ctx, *args):
        calls[0] += 1
        return backward(ctx, *args)

    mrandom.CheckpointFunction.backward = staticmethod(counted)
    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=0.0, weight_decay=0.01, total_steps=10)
    student_cfg = helpers.preset("tiny-student")
    objective = ObjectiveConfig(name="eopd", top_k=K, entropy_threshold=0.8, fused_output=True)
    rollouts = _rollouts(student_cfg.vocab_size)
    destroy_parallel()
    initialize_layouts({"student": (tp, pp, None), "teacher": (2, 1, None)}, seed=SEED)
    with use_layout("teacher"):
        chunks = build_model(helpers.preset("tiny-teacher"))
        init_weights_layout_invariant(chunks, SEED + 1)
        teacher = FrozenTeacher(chunks)
    out = {}
    for mode in ("none", "full", "selective"):
        with use_layout("student"):
            student = build_trainable(student_cfg, optim, SEED, recompute=mode)
            config = student.chunks[0].config
            granularity = config.recompute_granularity
            before = helpers.global_pieces(student.chunks)
        calls[0] = 0
        done = distill_on_rollouts(
            student, teacher, objective, rollouts, steps=2, micro_batch_size=MICRO, pad_id=0,
            vocab_size=student_cfg.vocab_size, top_k=K, temperature=1.0,
        )  # fmt: skip
        with use_layout("student"):
            after = helpers.global_pieces(student.chunks)
        out[mode] = {"before": before, "after": after, "calls": calls[0],
                     "granularity": granularity, "loss": done["last"]["loss"],
                     "layers": student_cfg.num_layers // pp}  # fmt: skip
    mrandom.CheckpointFunction.backward = staticmethod(backward)
    return out


def _check(world, tp, pp):
    results = run_distributed(step_worker, world, tp, pp, timeout=600)
    runs = {
        mode: {
            "before": helpers.assemble([r[mode]["before"] for r in results]),
            "after": helpers.assemble([r[mode]["after"] for r in results]),
        }
        for mode in ("none", "full", "selective")
    }
    ref = runs["none"]
    moved = max((ref["after"][k] - ref["before"][k]).abs().max().item() for k in ref["after"])
    assert moved > 1e-3, "the steps did not move the weights"
    # micro-batches of MICRO rows: 2 steps x (ROWS / 2) / MICRO = 2 per rank, whatever the stage
    micro = 2 * (ROWS // 2) // MICRO
    for r in results:
        assert r["none"]["calls"] == 0 and r["none"]["granularity"] is None
        layers = r["full"]["layers"]
        assert r["full"]["granularity"] == "full" and r["selective"]["granularity"] == "selective"
        assert r["full"]["calls"] == layers * micro, (r["full"]["calls"], layers, micro)
        assert r["selective"]["calls"] == layers * micro, (r["selective"]["calls"], layers, micro)
    for mode in ("full", "selective"):
        got = runs[mode]
        assert all(torch.equal(got["before"][k], ref["before"][k]) for k in ref["before"])
        diff = max((got["after"][k] - ref["after"][k]).abs().max().item() for k in ref["after"])
        assert diff <= 1e-6, f"{mode} recompute: the update differs by {diff:.2e}"
        loss = results[-1][mode]["loss"]
        assert abs(loss - results[-1]["none"]["loss"]) <= 1e-6 * max(1.0, abs(loss))


def test_recompute_updates_match_tp1_pp2():
    _check(2, 1, 2)


@pytest.mark.slow
def test_recompute_updates_match_tp2_pp2():
    _check(4, 2, 2)


def test_build_trainable_refuses_an_unknown_recompute():
    from megatron_eaopd.trainer.build import build_trainable

    with pytest.raises(ValueError, match="recompute='partial': one of"):
        build_trainable(helpers.preset("tiny-student"), None, 0, recompute="partial")


def _train_worker(rank, world, tmp, mode):
    from megatron_eaopd.config import load_config
    from megatron_eaopd.trainer import Trainer

    cfg = load_config(
        CONFIG, TINY_RUN + [f"training.recompute={mode}"] + one_iteration(tmp, f"run-{mode}")
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        built = trainer.student.chunks[0].config.recompute_granularity
        summary = trainer.run()
    finally:
        trainer.close()
    return {"summary": summary, "built": built}


@pytest.mark.slow
def test_trainer_with_full_recompute_matches_without(tmp_path):
    """One trainer iteration (warm start, rollouts, teacher scoring, update, eval, checkpoint) at
    DP 2 with and without full recompute: the student is built with it, the metrics agree."""
    tmp = str(tmp_path)
    (off, _) = run_distributed(_train_worker, 2, tmp, "none", timeout=600)
    (on, _) = run_distributed(_train_worker, 2, tmp, "full", timeout=600)
    assert on["built"] == "full" and off["built"] is None
    assert on["summary"]["iteration"] == 1 and not on["summary"]["stopped_early"]
    rows = {}
    for mode in ("none", "full"):
        with open(f"{tmp}/run-{mode}/metrics.jsonl", encoding="utf-8") as f:
            rows[mode] = [json.loads(line) for line in f if line.strip()]
    assert [r["split"] for r in rows["full"]] == [r["split"] for r in rows["none"]]
    for new, old in zip(rows["full"], rows["none"]):
        for key, value in old.items():
            if key.startswith(("time_", "memory_", "tokens_per_s")) or not isinstance(value, float):
                continue
            assert math.isfinite(new[key]) == math.isfinite(value), key
            if math.isfinite(value):
                assert abs(new[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, new[key], value)
