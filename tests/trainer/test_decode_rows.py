"""Evaluation decoding stays within a rollout's KV cache: the paper configs decoded an evaluation
set's prompts x eval.k at once (2,000 rows of 9,216 positions on MATH500, hundreds of GiB per
rank) while eaopd-plan, which did not model evaluation, said they fit."""

from __future__ import annotations

import math
from pathlib import Path

from megatron_eaopd.config import load_config
from megatron_eaopd.plan.cli import plan_config
from megatron_eaopd.trainer.decode_rows import eval_decode_rows, kv_bytes_per_position
from tests.paper_configs import hf_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _kv(cfg, who, rows, positions):
    lay = getattr(cfg.parallel, who)
    return rows * positions * kv_bytes_per_position(getattr(cfg.model, who), lay.tp, lay.pp)


def test_evaluation_rows_keep_the_kv_cache_within_a_rollouts(tmp_path):
    path = CONFIGS / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"
    cfg = load_config(path, hf_overrides(path, str(tmp_path)))
    r, dp = cfg.rollout, 2  # 8 ranks, TP 2 x PP 2
    rows = math.ceil(r.prompts_per_iteration * r.samples_per_prompt / dp)
    rollout = _kv(cfg, "student", rows, r.max_prompt_tokens + r.max_response_tokens)
    length = r.max_prompt_tokens + cfg.eval.max_response_tokens
    got = {who: eval_decode_rows(cfg, who, dp) for who in ("student", "teacher")}
    assert got == {"student": 35, "teacher": 27}
    for who, n in got.items():  # the most that fit the rollout's cache, not fewer
        assert _kv(cfg, who, n, length) <= rollout < _kv(cfg, who, n + 1, length)
    # Qwen3-8B's KV per position at TP 2 x PP 2: 2 x 18 layers x 4 groups x 128 x 2 bytes
    assert kv_bytes_per_position(cfg.model.teacher, 2, 2) == 36864
    # eaopd-plan plans the same rows, and its evaluation phases fit within the rollout's
    plan = plan_config(cfg, 8)
    assert plan["batch"]["eval_rows"] == got
    parts = plan["variants"]["fused"]["parts"]
    assert parts["evaluation (student)"] <= parts["rollout"]
    assert parts["evaluation (teacher)"] <= parts["rollout"]
    # a set rollout.max_decode_batch is used as it is, and the plan counts what it costs
    wide = load_config(path, [*hf_overrides(path, str(tmp_path)), "rollout.max_decode_batch=2000"])
    assert eval_decode_rows(wide, "teacher", dp) == 2000
    plan = plan_config(wide, 8)
    assert plan["batch"]["decode_rows"] == rows  # a rollout has no more rows than that
    assert plan["variants"]["fused"]["peak"] > 600 * 2**30  # what the old default needed


def test_at_least_one_row():
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["eval.max_response_tokens=100000",
                                                   "model.student.max_seq_len=0",
                                                   "model.teacher.max_seq_len=0"])  # fmt: skip
    assert eval_decode_rows(cfg, "teacher", 2) == 1


def _evaluate_worker(rank, world):
    """What evaluate passes to the sampler as max_batch, for the teacher and the student."""
    from types import SimpleNamespace

    from megatron_eaopd.data import Problem
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts
    from megatron_eaopd.trainer import evaluate

    class Stop(Exception):
        pass

    seen = []

    def sample(model, problems, k, tokenizer, **kwargs):
        seen.append((len(problems) * k, kwargs["max_batch"]))
        raise Stop

    evaluate.sample_problems = sample
    initialize_layouts({"student": (1, 1, None), "teacher": (1, 1, None)}, seed=1)
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["eval.k=8", "rollout.prompts_per_iteration=8",
                                                   "rollout.mini_batch_size=8"])  # fmt: skip
    problems = [Problem(f"p{i}", f"count down from {i}", "0") for i in range(64)]
    trainer = SimpleNamespace(
        cfg=cfg, data=SimpleNamespace(eval_sets={"e": problems}, tokenizer=None, vocab_size=300),
        teacher=None,
        student=SimpleNamespace(chunks=None), progress=lambda *a: None, rank0=True,
    )  # fmt: skip
    for who in ("teacher", "student"):
        try:
            evaluate.evaluate(trainer, 0, who)
        except Stop:
            pass
    destroy_parallel()
    return seen, [eval_decode_rows(cfg, who, 1) for who in ("teacher", "student")]


def test_evaluate_decodes_at_most_the_bound():
    from tests.dist import run_distributed

    seen, bounds = run_distributed(_evaluate_worker, 1, timeout=120)[0]
    assert [n for n, _ in seen] == [512, 512]  # 64 prompts x k 8 on one replica
    assert [m for _, m in seen] == bounds and all(m < 512 for m in bounds)


def test_the_plan_cuts_micro_batches_as_the_replicas_do(tmp_path):
    """The plan divided mini_batch_size x samples evenly over the replicas; the trainer deals
    prompts round-robin (ceil or floor of m / dp each, with all their samples) and each replica
    cuts its own rows, so the plan showed smaller micro-batches than ran, and a 'fits'."""
    from megatron_eaopd.trainer.batches import largest_divisor
    from megatron_eaopd.trainer.update import replica_prompts

    path = CONFIGS / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"
    # 32 prompts per mini-batch: over 6 replicas 6 or 5 (x 4 samples: 24 or 20 rows, cut in 4s;
    # the plan had 22 rows in 2s), over 3 replicas 11 or 10 (the plan had 1-row micro-batches)
    for world, extra in ((24, ["rollout.samples_per_prompt=4"]),
                         (12, ["rollout.micro_batch_size=8"])):  # fmt: skip
        cfg = load_config(path, [*hf_overrides(path, str(tmp_path)), *extra])
        r, dp = cfg.rollout, world // 4
        steps = r.prompts_per_iteration // r.mini_batch_size
        counts = [len(replica_prompts(list(range(r.mini_batch_size)), r.mini_batch_size, dp, d))
                  * r.samples_per_prompt for d in range(dp)]  # fmt: skip
        batch = plan_config(cfg, world)["batch"]
        assert batch["micro_batch"] == max(largest_divisor(n, r.micro_batch_size) for n in counts)
        assert batch["rows"] == steps * max(counts)
        assert batch["micro_batches"] == max(n // largest_divisor(n, r.micro_batch_size)
                                             for n in counts)  # fmt: skip
    assert batch["micro_batch"] == 5  # a replica with 10 prompts: micro-batches of 5
