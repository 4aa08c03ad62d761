"""Distillation steps are the same network update at every student and teacher layout.

Fixed rollouts (written to a file here, read by every rank: no sampling) go through the trainer's
own update path (`trainer.update.distill_on_rollouts`: teacher scoring at the teacher's layout,
point-to-point payload routing, megatron's schedule, DDP, AdamW), two optimizer steps of three
prompts each, so replicas hold unequal shares and at DP 4 one replica is idle. The updated student
weights, assembled from every rank's shards, must equal those of a single process (TP 1) within
1e-5 in fp32, at student layouts TP1, TP2, PP2, TP1 x DP2, TP2 x DP2, TP1 x DP4 and
TP2 x PP2 x DP2, each with a teacher layout that differs from the student's (TP 2, PP 2).
Micro-batches are cut to their own longest row (widths differ: under PP megatron's schedule sends
each activation's shape), which must be the update of micro-batches all padded to the longest
row (``trim=False``); with a token budget (``micro_batch_tokens``) their row counts differ too,
between micro-batches, steps and replicas, with the same update.

Gradient clipping is off and Adam's epsilon is 1e-3, so the update is close to linear in the
gradient: a wrong token normalisation over data-parallel replicas (a factor of dp), a payload
delivered to the wrong replica, or a lost micro-batch moves weights far more than 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers

PROMPTS, SAMPLES, K, SEED = 6, 2, 4, 5
MINI_BATCH = 3  # two optimizer steps of 3 prompts: at DP 4 one replica is idle in each step

BUDGET = 30  # tokens per micro-batch: rows of 5-14 tokens, 1 to 3 per micro-batch

# (student (tp, pp), teacher (tp, pp)[, micro-batch size[, token budget]]) per world size
LAYOUTS = {
    1: [((1, 1), (1, 1)), ((1, 1), (1, 1), 6, BUDGET)],
    # PP 2 with one micro-batch per step (micro-batch size 6): each step's micro-batch has its
    # own width, below the longest of the other step's; with the budget, micro-batches of
    # different rows under the student's PP 2 and the teacher's PP 2 (with DP 2 students)
    2: [
        ((2, 1), (1, 1)),
        ((1, 2), (2, 1)),
        ((1, 1), (2, 1)),
        ((1, 1), (1, 2)),
        ((1, 2), (1, 1), 6),
        ((1, 2), (2, 1), 6, BUDGET),
        ((1, 1), (1, 2), 6, BUDGET),
    ],
    4: [((2, 1), (2, 2)), ((1, 1), (1, 2))],
    8: [((2, 2), (2, 1)), ((2, 2), (1, 2))],
}


def write_rollouts(path: str) -> None:
    """PROMPTS x SAMPLES rows with prompts of 2-6 tokens, responses of 1-9 tokens, random ids
    and old log-probs in [-4, -0.05] at response positions (RolloutBatch fields)."""
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(11)
    rows = PROMPTS * SAMPLES
    prompt = torch.randint(2, 7, (PROMPTS,), generator=gen).repeat_interleave(SAMPLES)
    response = torch.randint(1, 10, (rows,), generator=gen)
    vocab = helpers.preset("tiny-student").vocab_size
    batch = random_rollouts(prompt, response, vocab, gen)
    torch.save(batch.__dict__, path)


def replica_rows(batch, dp: int, dp_rank: int):
    """The trainer's split: per mini-batch of 3 prompts, replicas get 2 + 1 at DP 2 and
    1 + 1 + 1 + 0 at DP 4 (the idle replica gets None)."""
    from megatron_eaopd.rollout import RolloutBatch
    from megatron_eaopd.trainer.update import replica_prompts

    prompts = replica_prompts(list(range(PROMPTS)), MINI_BATCH, dp, dp_rank)
    if not prompts:
        return None
    rows = [p * SAMPLES + j for p in prompts for j in range(SAMPLES)]
    picked = {k: v[rows] for k, v in batch.items()}
    width = int((picked["prompt_lens"] + picked["response_lens"]).max())  # this replica's own
    for key in ("tokens", "logprobs", "entropies"):
        picked[key] = picked[key][:, :width].contiguous()
    return RolloutBatch(**picked)


def step_worker(rank, world, path, layouts, trim=True):
    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.models import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts, use_layout
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import distill_on_rollouts, reduce_outputs

    batch = torch.load(path)
    student_cfg, teacher_cfg = helpers.preset("tiny-student"), helpers.preset("tiny-teacher")
    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=0.0, weight_decay=0.01, total_steps=10)
    objective = ObjectiveConfig(name="eopd", top_k=K, entropy_threshold=0.8)
    out = []
    for student_layout, teacher_layout, *sizes in layouts:
        destroy_parallel()
        initialize_layouts(
            {"student": (*student_layout, None), "teacher": (*teacher_layout, None)}, seed=SEED
        )
        with use_layout("teacher"):
            chunks = build_model(teacher_cfg)
            init_weights_layout_invariant(chunks, SEED + 1)
            teacher = FrozenTeacher(chunks)
        with use_layout("student") as lay:
            student = build_trainable(student_cfg, optim, SEED)
            before = helpers.global_pieces(student.chunks)
        rollouts = replica_rows(batch, lay.dp, lay.dp_rank)
        done = distill_on_rollouts(
            student, teacher, objective, rollouts, steps=PROMPTS // MINI_BATCH,
            micro_batch_size=sizes[0] if sizes else 2, pad_id=0,
            vocab_size=student_cfg.vocab_size, top_k=K, temperature=1.0, trim=trim,
            micro_batch_tokens=sizes[1] if len(sizes) > 1 else None,
        )  # fmt: skip
        widths = [tuple(mb["tokens"].shape) for mb in done["micro"]]
        with use_layout("student"):
            metrics = reduce_outputs(done["outputs"], ["loss", "fkl", "pg_loss"])
            after = helpers.global_pieces(student.chunks)
        out.append({"before": before, "after": after, "metrics": metrics, "dp": lay.dp,
                    "shapes": widths})  # fmt: skip
    return out


def _run(world: int, path: str, trim: bool = True, layouts=None) -> list[dict]:
    layouts = LAYOUTS[world] if layouts is None else layouts
    results = run_distributed(step_worker, world, path, layouts, trim, timeout=600)
    return [
        {
            "before": helpers.assemble([r[i]["before"] for r in results]),
            "after": helpers.assemble([r[i]["after"] for r in results]),
            "metrics": results[0][i]["metrics"],
            "dp": results[0][i]["dp"],
            "widths": [s for _, s in results[0][i]["shapes"]],
            "rows": [[b for b, _ in r[i]["shapes"]] for r in results],  # per rank
            "layout": layouts[i],
        }
        for i in range(len(layouts))
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("rollouts"), "rollouts.pt")
    write_rollouts(path)
    ref, budget = _run(1, path)
    moved = max((ref["after"][k] - ref["before"][k]).abs().max().item() for k in ref["after"])
    assert moved > 1e-3, "the reference step did not move the weights"
    # each micro-batch is cut to its own longest row, so their widths differ (under PP the
    # schedule sends shapes) ...
    assert len(set(ref["widths"])) > 1, ref["widths"]
    # ... and that is the same update as padding every micro-batch to the longest row
    (padded,) = _run(1, path, trim=False, layouts=LAYOUTS[1][:1])
    assert len(set(padded["widths"])) == 1
    _check(padded, ref)
    # a token budget: micro-batches of different row counts, each within the budget
    rows = budget["rows"][0]
    assert len(set(rows)) > 1 and max(rows) > 2, rows
    assert all(b * s <= BUDGET or b == 1 for b, s in zip(rows, budget["widths"]))
    _check(budget, ref)
    return path, ref


def _check(result, ref):
    assert set(result["after"]) == set(ref["after"])
    for key, value in ref["before"].items():  # the same network before the step
        torch.testing.assert_close(result["before"][key], value, rtol=0, atol=1e-7, msg=key)
    for key, value in ref["after"].items():
        diff = (result["after"][key] - value).abs().max().item()
        assert diff <= 1e-5, f"{result['layout']}: {key} differs by {diff:.2e}"
    for name, value in ref["metrics"].items():
        assert abs(result["metrics"][name] - value) <= 1e-5 * max(1.0, abs(value)), name


# world 4 (student TP 2 x DP 2 against teacher TP 2 x PP 2, and DP 4) is slow: 35 s of the default
# suite's 15-minute budget; test_dp_layouts runs DP 4 with a TP 2 x PP 2 teacher in the trainer
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_one_step_is_layout_invariant(reference, world):
    path, ref = reference
    results = _run(world, path)
    assert any(r["dp"] > 1 for r in results)
    if world == 2:  # one micro-batch per step, of widths that differ between the steps
        assert len(results[4]["widths"]) == 2 and len(set(results[4]["widths"])) == 2
        # budgets: replicas with different numbers of micro-batches of different row counts
        assert len(set(results[5]["rows"][0])) > 1
        counts = {len(r) for r in results[6]["rows"]}
        assert results[6]["dp"] == 2 and len(counts) == 2, results[6]["rows"]
    for result in results:
        _check(result, ref)


@pytest.mark.slow
def test_one_step_is_layout_invariant_8_ranks(reference):
    path, ref = reference
    for result in _run(8, path):
        assert result["dp"] == 2
        _check(result, ref)


def write_equal_rollouts(path: str) -> None:
    """PROMPTS x SAMPLES rows all of 10 tokens (4 prompt + 6 response)."""
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(3)
    rows = PROMPTS * SAMPLES
    prompt, response = torch.full((rows,), 4), torch.full((rows,), 6)
    torch.save(random_rollouts(prompt, response, helpers.preset("tiny-student").vocab_size,
                               gen).__dict__, path)  # fmt: skip


def test_equal_widths_with_different_rows_under_pp(tmp_path):
    """A budget of 4 rows of 10 tokens: each step's 6 rows make micro-batches [4, 10] and
    [2, 10], of one width but not one row count (the student's PP 2 must send shapes), and at
    student DP 2 the replicas' [4, 10] and [2, 10] reach a PP 2 teacher (its schedule too)."""
    path = str(tmp_path / "equal.pt")
    write_equal_rollouts(path)
    (ref,) = _run(1, path, layouts=[((1, 1), (1, 1), 6)])
    results = _run(2, path, layouts=[((1, 2), (1, 1), 6, 40), ((1, 1), (1, 2), 6, 40)])
    assert results[0]["rows"][0] == [4, 2, 4, 2] and set(results[0]["widths"]) == {10}
    assert sorted(r for rank in results[1]["rows"] for r in rank) == [2, 2, 4, 4]
    for result in results:
        _check(result, ref)
