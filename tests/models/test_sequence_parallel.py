"""Megatron sequence parallelism (``parallel.sequence_parallel``) on CPU over gloo.

Against the same model without it (the independent path): one distillation step on fixed
rollouts of odd lengths (padded to a multiple of tp and masked) through the trainer's update path
gives the same updated student weights (fp32, 1e-5), at TP 2 and (slow) TP 2 x PP 2; generation
with the sequence-parallel model (switched off for the decode, restored after) gives the same
tokens. A negative control strips the norm weights' ``sequence_parallel`` tags (so megatron does
not all-reduce their gradients over TP) and must move them differently: the comparison is
sensitive to a missing reduction. Then the trainer end to end with ``parallel.sequence_parallel``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers
from tests.trainer.common import CONFIG, TINY_RUN, one_iteration

SEED, K, ROWS = 7, 4, 6

# A variant with LayerNorm, biases, QK-norm and untied embeddings (every kind of parameter whose
# gradient sequence parallelism splits over the sequence: norm weights and biases, row-parallel
# biases) with the loss fused with the output layer (the hidden states are gathered over the
# sequence), and the tiny student as is (RMSNorm, tied embeddings, no biases) with the logits
# path (megatron's output layer gathers).
VARIANTS = {
    "layernorm-bias-qknorm-fused": (
        dict(
            normalization="LayerNorm", add_bias_linear=True, qk_layernorm=True,
            untie_embeddings_and_output_weights=True,
        ),
        True,
    ),
    "rmsnorm-logits": ({}, False),
    "rmsnorm-exact-fused": ({}, True),  # the exact form: the teacher's hidden states beside
}  # fmt: skip


def _rollouts(vocab: int):
    """ROWS rows, prompts of 2-5 tokens, responses of 1-8 tokens, the longest 13 (odd: padded to
    14 at TP 2), random ids and old log-probs at response positions."""
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, 6, (ROWS,), generator=gen)
    response = torch.randint(1, 9, (ROWS,), generator=gen)
    prompt[0], response[0] = 5, 8  # width 13
    return random_rollouts(prompt, response, vocab, gen)


def test_collate_pads_to_a_multiple_and_masks_the_padding():
    """The padding sequence parallelism needs: same label-aligned prefix, pad tokens after it,
    nothing of it in the loss mask."""
    from megatron_eaopd.trainer.batches import collate

    rollouts = _rollouts(50)
    plain = collate(rollouts, pad_id=0)
    assert plain["tokens"].shape[1] == 13
    for multiple, width in ((1, 13), (2, 14), (4, 16), (13, 13)):
        padded = collate(rollouts, pad_id=0, multiple=multiple)
        assert padded["tokens"].shape[1] == width
        for key, value in plain.items():
            assert torch.equal(padded[key][:, :13], value), key
        assert not padded["loss_mask"][:, 13:].any() and (padded["tokens"][:, 13:] == 0).all()
        assert torch.equal(padded["position_ids"][0], torch.arange(width))


def _strip_norm_tags(chunks) -> int:
    """Negative control: remove the sequence-parallel tag of every norm parameter."""
    n = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if "norm" in name and getattr(p, "sequence_parallel", False):
                p.sequence_parallel = False
                n += 1
    return n


def _sp_state(chunks) -> list:
    """Every sequence-parallel flag a forward reads (config, modules' attributes)."""
    out = []
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        out.append(module.config.sequence_parallel)
        for sub in module.modules():
            for name in ("sequence_parallel", "reduce_scatter_embeddings", "allreduce_dgrad"):
                if isinstance(getattr(sub, name, None), bool):
                    out.append((type(sub).__name__, name, getattr(sub, name)))
    return out


def step_worker(rank, world, tp, pp, variants):
    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.models import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts, use_layout
    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import distill_on_rollouts

    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=0.0, weight_decay=0.01, total_steps=10)
    teacher_cfg = helpers.preset("tiny-teacher")
    out = {}
    for variant in variants:
        changes, fused = VARIANTS[variant]
        kind = dict(form="exact") if "exact" in variant else {}
        objective = ObjectiveConfig(name="eopd", top_k=K, entropy_threshold=0.8, **kind)
        if "fused_output" in {f.name for f in dataclasses.fields(ObjectiveConfig)}:
            objective = dataclasses.replace(objective, fused_output=fused)
        student_cfg = dataclasses.replace(helpers.preset("tiny-student"), **changes)
        rollouts = _rollouts(student_cfg.vocab_size)
        destroy_parallel()
        initialize_layouts({"student": (tp, pp, None), "teacher": (2, 1, None)}, seed=SEED)
        with use_layout("teacher"):
            chunks = build_model(teacher_cfg)
            init_weights_layout_invariant(chunks, SEED + 1)
            teacher = FrozenTeacher(chunks)
        result = {}
        for name, sp, strip in (
            ("off", False, False),
            ("on", True, False),
            ("stripped", True, True),
        ):
            with use_layout("student"):
                student = build_trainable(student_cfg, optim, SEED, sequence_parallel=sp)
                if strip:
                    assert _strip_norm_tags(student.chunks) > 0
                before = helpers.global_pieces(student.chunks)
                tokens = None
                if name != "stripped":
                    flags = _sp_state(student.chunks)
                    prompts = [rollouts.tokens[i, : int(rollouts.prompt_lens[i])].tolist()
                               for i in range(ROWS)]  # fmt: skip
                    gen = torch.Generator().manual_seed(5)
                    tokens = generate(
                        student.chunks, prompts, max_new_tokens=9, eos_id=1, pad_id=0,
                        vocab_size=student_cfg.vocab_size, params=SamplingParams(temperature=1.0),
                        generator=gen,
                    ).tokens  # fmt: skip
                    assert _sp_state(student.chunks) == flags, "flags not restored"
                    assert student.chunks[0].config.sequence_parallel is sp
            done = distill_on_rollouts(
                student, teacher, objective, rollouts, steps=1, micro_batch_size=3, pad_id=0,
                vocab_size=student_cfg.vocab_size, top_k=K, temperature=1.0,
            )  # fmt: skip
            with use_layout("student"):
                after = helpers.global_pieces(student.chunks)
            seq = done["micro"][0]["tokens"].shape[1]
            result[name] = {"before": before, "after": after, "tokens": tokens, "seq": seq,
                            "loss": done["last"]["loss"]}  # fmt: skip
        out[variant] = result
    return out


def _max_diff(a: dict, b: dict, keys=None) -> float:
    keys = keys or a.keys()
    return max((a[k] - b[k]).abs().max().item() for k in keys)


def _check(world, tp, pp, variants):
    results = run_distributed(step_worker, world, tp, pp, variants, timeout=600)
    for variant in variants:
        runs = {
            name: {
                "before": helpers.assemble([r[variant][name]["before"] for r in results]),
                "after": helpers.assemble([r[variant][name]["after"] for r in results]),
                **{k: results[-1][variant][name][k] for k in ("tokens", "seq", "loss")},
            }
            for name in ("off", "on")
        }
        off, on = runs["off"], runs["on"]
        assert off["seq"] == 13 and on["seq"] == 14, "odd rollouts padded to a multiple of tp"
        assert _max_diff(off["before"], on["before"]) == 0.0
        moved = _max_diff(off["after"], off["before"])
        assert moved > 1e-3, f"{variant}: the step did not move the weights"
        diff = _max_diff(on["after"], off["after"])
        assert diff <= 1e-5, f"{variant}: sequence parallel update differs by {diff:.2e}"
        assert abs(on["loss"] - off["loss"]) <= 1e-5 * max(1.0, abs(off["loss"]))
        assert torch.equal(on["tokens"], off["tokens"]), f"{variant}: generated tokens differ"
        # the control: each rank's norm weights (its TP peers then disagree: no assembling)
        wrong = 0.0
        for r in results:
            for key, pieces in r[variant]["off"]["after"].items():
                if "norm" in key:
                    for (_, ref), (_, got) in zip(pieces, r[variant]["stripped"]["after"][key]):
                        wrong = max(wrong, (got - ref).abs().max().item())
        assert wrong > 1e-4, f"{variant}: unreduced norm grads went unnoticed ({wrong:.2e})"
        print(f"{variant}: moved {moved:.2e}, sp vs off {diff:.2e}, untagged norms {wrong:.2e}")


def test_sequence_parallel_step_and_generation_match_tp2():
    _check(2, 2, 1, ["layernorm-bias-qknorm-fused"])


@pytest.mark.slow
def test_sequence_parallel_step_and_generation_match_tp2_logits():
    _check(2, 2, 1, ["rmsnorm-logits", "rmsnorm-exact-fused"])


@pytest.mark.slow
def test_sequence_parallel_step_and_generation_match_tp2_pp2():
    _check(4, 2, 2, ["layernorm-bias-qknorm-fused", "rmsnorm-logits"])


def _train_worker(rank, world, tmp, sp):
    from megatron_eaopd.config import load_config
    from megatron_eaopd.trainer import Trainer

    cfg = load_config(
        CONFIG,
        TINY_RUN
        + [f"parallel.sequence_parallel={str(sp).lower()}"]
        + one_iteration(tmp, f"run-{sp}"),
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        built_sp = trainer.student.chunks[0].config.sequence_parallel
        summary = trainer.run()
        seqs = [mb["tokens"].shape[1] for mb in trainer.last_micro_batches]
    finally:
        trainer.close()
    return {"summary": summary, "sp": built_sp, "seqs": seqs}


@pytest.mark.slow
def test_trainer_with_sequence_parallel_matches_without(tmp_path):
    """One trainer iteration (warm start, rollouts, teacher scoring, update, eval, checkpoint) at
    student TP 2 with and without sequence parallelism: the same metrics."""
    tmp = str(tmp_path)
    (off, _) = run_distributed(_train_worker, 2, tmp, False, timeout=600)
    (on, _) = run_distributed(_train_worker, 2, tmp, True, timeout=600)
    assert on["sp"] is True and off["sp"] is False
    assert on["summary"]["iteration"] == 1 and not on["summary"]["stopped_early"]
    assert all(s % 2 == 0 for s in on["seqs"]), on["seqs"]  # padded to a multiple of tp
    rows = {}
    for sp in (False, True):
        with open(f"{tmp}/run-{sp}/metrics.jsonl", encoding="utf-8") as f:
            rows[sp] = [json.loads(line) for line in f if line.strip()]
    assert [r["split"] for r in rows[True]] == [r["split"] for r in rows[False]]
    assert {"train", "eval"} <= {r["split"] for r in rows[True]}
    for on, off in zip(rows[True], rows[False]):
        for key, value in off.items():
            if key.startswith(("time_", "memory_", "tokens_per_s")) or not isinstance(value, float):
                continue
            assert math.isfinite(on[key]) == math.isfinite(value), key
            if math.isfinite(value):
                assert abs(on[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, on[key], value)
