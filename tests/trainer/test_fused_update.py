"""The trainer's update fused with the output layer (loss.fused_output) is the logits path's update.

Fixed rollouts (no sampling) go through the trainer's own update (`trainer.update.
distill_on_rollouts`: teacher scoring at the teacher's layout, megatron's schedule, DDP, AdamW),
two optimizer steps, once with `fused_output=False` (model logits -> vocab-parallel loss) and once
with `fused_output=True` (hidden states + output weight shard -> `losses.fused`, 5-token chunks),
on 2 gloo ranks in fp32 at: student TP 1 x DP 2 / teacher TP 2, student TP 2 / teacher TP 1 x DP 2,
student PP 2 / teacher TP 2 (sampled form) and student TP 2 / teacher TP 2 (exact form). The
student has tied embeddings (at PP 2 the last stage's output weight is the embedding's copy), the
teacher untied; the shared vocabulary (300) is smaller than the padded one (352).

Checked: the updated student weights (assembled from every rank) agree within 2e-6 and the
reported metrics and gradient norms within 1e-5 relative; the fused run never calls either
model's output layer, and no tensor whose last dimension is the vocabulary shard has more rows
than the chunk (a dispatch mode watches every op, backward included), while the logits run makes
[b * s, V_pad / tp] logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed
from tests.models import helpers

PROMPTS, SAMPLES, K, SEED, VOCAB, PADDED, CHUNK = 4, 2, 4, 7, 300, 352, 5

# (form, student (tp, pp), teacher (tp, pp)); the default run takes the two TP 2 students (teacher
# payload at TP 1 x DP 2; exact form), the slow one the TP 1 x DP 2 and PP 2 students
CASES = [
    ("sampled", (1, 1), (2, 1)),
    ("sampled", (2, 1), (1, 1)),
    ("sampled", (1, 2), (2, 1)),
    ("exact", (2, 1), (2, 1)),
]
NAMES = {
    "sampled": ["loss", "pg_loss", "fkl", "student_entropy", "teacher_entropy", "gate"],
    "exact": ["loss", "rkl", "fkl", "student_entropy", "teacher_entropy", "gate", "fkl_gated"],
}


def make_rollouts():
    """PROMPTS x SAMPLES rows, prompts of 2-5 tokens, responses of 2-8 tokens, ids < VOCAB, old
    log-probs in [-4, -0.05] at response positions."""
    from tests.trainer.common import random_rollouts

    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, 6, (PROMPTS,), generator=gen).repeat_interleave(SAMPLES)
    response = torch.randint(2, 9, (PROMPTS * SAMPLES,), generator=gen)
    return random_rollouts(prompt, response, VOCAB, gen)


class LogitWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest row count (numel / last dim) of any op output whose last dim is in `widths` and
    contiguous (logits and their gradients; not the transposed weight views of a matmul)."""

    def __init__(self, widths: set):
        super().__init__()
        self.widths, self.rows = widths, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.widths
                and t.stride(-1) == 1  # not a transposed [h, V / tp] view of a weight
            ):  # fmt: skip
                self.rows = max(self.rows, t.numel() // t.shape[-1])
        return out


def _worker(rank, world, cases):
    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.models import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts, use_layout
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import distill_on_rollouts, reduce_outputs, replica_prompts

    rollouts = make_rollouts()
    # 352 columns (11 x 32: the same padding at TP 1 and 2) so that no other activation is as
    # wide as a vocabulary shard (352 or 176)
    s_cfg, t_cfg = (
        dataclasses.replace(helpers.preset(name), vocab_size=PADDED)
        for name in ("tiny-student", "tiny-teacher")
    )
    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=0.0, weight_decay=0.01, total_steps=10)
    out = []
    for form, s_lay, t_lay in cases:
        for fused in (False, True):
            destroy_parallel()
            initialize_layouts({"student": (*s_lay, None), "teacher": (*t_lay, None)}, seed=SEED)
            with use_layout("teacher"):
                chunks = build_model(t_cfg)
                init_weights_layout_invariant(chunks, SEED + 1)
                teacher = FrozenTeacher(chunks)
            with use_layout("student") as lay:
                student = build_trainable(s_cfg, optim, SEED)
            calls = {"student": 0, "teacher": 0}
            for who, mods in (("student", student.chunks), ("teacher", teacher.chunks)):
                for m in mods:
                    for sub in m.modules():
                        if hasattr(sub, "output_layer"):  # the GPTModel inside the wrappers

                            def hook(*_a, who=who, calls=calls):
                                calls[who] += 1

                            sub.output_layer.register_forward_hook(hook)
            prompts = replica_prompts(list(range(PROMPTS)), 2, lay.dp, lay.dp_rank)
            rows = [p * SAMPLES + j for p in prompts for j in range(SAMPLES)]
            mine = type(rollouts)(**{k: v[rows] for k, v in rollouts.__dict__.items()})
            objective = ObjectiveConfig(
                name="eopd", form=form, top_k=K, entropy_threshold=1.0, fused_output=fused,
                fused_chunk_size=CHUNK, chunk_size=3,
            )  # fmt: skip
            watch = LogitWatch({PADDED // s_lay[0], PADDED // t_lay[0]})
            with watch:
                done = distill_on_rollouts(
                    student, teacher, objective, mine, steps=2, micro_batch_size=2, pad_id=0,
                    vocab_size=VOCAB, top_k=K, temperature=1.0, chunk_size=3,
                )  # fmt: skip
            with use_layout("student"):
                metrics = reduce_outputs(done["outputs"], NAMES[form])
                after = helpers.global_pieces(student.chunks)
            out.append(
                {
                    "after": after, "metrics": metrics, "grad_norms": done["grad_norms"],
                    "calls": calls, "rows": watch.rows,
                    "tokens": max(mb["tokens"].numel() for mb in done["micro"]),
                }
            )  # fmt: skip
    destroy_parallel()
    return out


def _check(results, cases):
    for i, case in enumerate(cases):
        un, fu = (
            {
                "after": helpers.assemble([r[2 * i + j]["after"] for r in results]),
                **{k: results[0][2 * i + j][k] for k in ("metrics", "grad_norms")},
                "calls": [r[2 * i + j]["calls"] for r in results],
                "rows": [r[2 * i + j]["rows"] for r in results],
                "tokens": [r[2 * i + j]["tokens"] for r in results],
            }
            for j in (0, 1)
        )
        for key, value in un["after"].items():
            diff = (fu["after"][key] - value).abs().max().item()
            assert diff <= 2e-6, f"{case}: {key} differs by {diff:.2e}"
        for name, value in un["metrics"].items():
            assert fu["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (case, name)
        assert fu["grad_norms"] == pytest.approx(un["grad_norms"], rel=1e-5), case
        # the logits path calls the output layers and makes [b * s, V / tp] logits
        assert all(c["teacher"] > 0 for c in un["calls"]), (case, un["calls"])
        assert any(c["student"] > 0 for c in un["calls"]), (case, un["calls"])
        assert max(un["rows"]) >= min(un["tokens"]) > CHUNK, (case, un["rows"], un["tokens"])
        # the fused path never does: the largest vocabulary-wide tensor is one chunk
        assert all(c == {"student": 0, "teacher": 0} for c in fu["calls"]), (case, fu["calls"])
        assert max(fu["rows"]) <= CHUNK, (case, fu["rows"])


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param([CASES[1], CASES[3]], id="tp2-sampled-and-exact"),
        pytest.param([CASES[0], CASES[2]], id="tp1-and-pp2-sampled", marks=pytest.mark.slow),
    ],
)
def test_fused_update_equals_logits_update(cases):
    results = run_distributed(_worker, 2, cases, timeout=600)
    _check(results, cases)


def test_fused_output_key_resolves_and_refuses_jsd():
    """loss.fused_output: null is on for every objective but jsd; true with jsd is refused naming
    the key; loss.fused_chunk_size reaches the objective."""
    from megatron_eaopd.config import load_config, objective_kwargs
    from megatron_eaopd.config.checks import run_problems
    from megatron_eaopd.losses import ObjectiveConfig
    from tests.trainer.common import CONFIG

    def objective(*overrides):
        return ObjectiveConfig(**objective_kwargs(load_config(CONFIG, list(overrides)).loss))

    assert objective().use_fused and objective("loss.objective=eopd_exact").use_fused
    assert not objective("loss.objective=jsd").use_fused
    assert not objective("loss.fused_output=false").use_fused
    assert objective("loss.fused_chunk_size=64").fused_chunk_size == 64
    cfg = load_config(CONFIG, ["loss.objective=jsd", "loss.fused_output=true"])
    assert [key for key, _ in run_problems(cfg, 2)] == ["loss.fused_output"]
    with pytest.raises(ValueError, match="jsd"):
        ObjectiveConfig(name="jsd", form="exact", fused_output=True)


@pytest.mark.parametrize(
    "overrides, fused, chunk",
    [
        ([], True, None),
        (["loss.fused_output=false"], False, None),
        (["loss.fused_chunk_size=7"], True, 7),
        (["loss.objective=jsd", "loss.fused_chunk_size=9"], True, 9),  # evaluation measures eopd
    ],
)
def test_evaluation_teacher_scoring_reads_the_fused_keys(monkeypatch, overrides, fused, chunk):
    """The evaluation's teacher payload follows loss.fused_output and loss.fused_chunk_size like
    the update's (it used to be fused with the default chunk whatever the keys said)."""
    from types import SimpleNamespace

    from megatron_eaopd.config import load_config, objective_kwargs
    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.trainer import evaluate
    from tests.trainer.common import CONFIG

    seen = {}

    class Stop(Exception):
        pass

    def score(teacher, micro, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(evaluate, "score_with_teacher", score)
    cfg = load_config(CONFIG, overrides)
    trainer = SimpleNamespace(
        cfg=cfg, data=SimpleNamespace(tokenizer=None, vocab_size=300), teacher=None,
        student=None, objective=ObjectiveConfig(**objective_kwargs(cfg.loss)),
    )  # fmt: skip
    with pytest.raises(Stop):
        evaluate._entropy_sums(trainer, None, 0.5)
    assert seen["fused"] is fused and seen["fused_chunk_size"] == chunk, seen
