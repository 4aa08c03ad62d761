"""The exact loss form in the trainer (teacher logits shard beside the student's, TP=2 over gloo):
a short eopd_exact run trains and logs finite metrics, and the first step's loss equals the
full-vocabulary KL terms computed independently on the same rollouts; unsupported exact layouts
are refused before any compute."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer.common import CONFIG, TINY_RUN

# one optimizer step per iteration (prompts_per_iteration == mini_batch_size), so the first
# iteration's loss is the loss of the first step
TINY = [
    "loss.objective=eopd_exact",
    "rollout.prompts_per_iteration=4",
    "rollout.mini_batch_size=4",
    "rollout.micro_batch_size=4",
    "student_prep.enabled=false",
    "optimizer.warmup_iterations=2",  # at most the run's 2 optimizer steps
] + TINY_RUN


def _cfg(tmp, name, extra=()):
    from megatron_eaopd.config import load_config

    return load_config(
        CONFIG,
        TINY
        + [
            f"training.output_dir={tmp}/{name}",
            f"teacher_prep.cache_dir={tmp}/teachers",
            f"tokenizer.cache_dir={tmp}/tokenizers",
            *extra,
        ],
    )


def _first_step_check(cfg):
    """Loss of iteration 1 (one optimizer step) from the trainer, and the same loss computed from
    the student's initial weights and a fresh teacher forward with vocab_parallel_kl_terms."""
    import torch

    from megatron_eaopd.losses import vocab_parallel_kl_terms
    from megatron_eaopd.parallel.init import use_layout
    from megatron_eaopd.trainer.build import STUDENT, TEACHER
    from megatron_eaopd.trainer.loop import Trainer

    trainer = Trainer(cfg).setup()
    params = [p for c in trainer.student.chunks for p in c.parameters()]
    initial = [p.detach().clone() for p in params]
    metrics = trainer.train_iteration(1)
    trained = [p.detach().clone() for p in params]
    moved = any(not torch.equal(a, b) for a, b in zip(initial, trained))
    with torch.no_grad():
        for p, v in zip(params, initial):
            p.copy_(v)
        total, count = 0.0, 0.0
        vocab, tau = trainer.data.vocab_size, cfg.loss.entropy_threshold
        for mb in trainer.last_micro_batches:
            with use_layout(STUDENT):
                student = trainer.student.chunks[0](mb["tokens"], mb["position_ids"], None)
            with use_layout(TEACHER):
                teacher = trainer.teacher(mb["tokens"], mb["position_ids"], None).float()
            with use_layout(STUDENT):
                terms = vocab_parallel_kl_terms(student.float(), teacher, vocab_size=vocab)
            gate = (terms["teacher_entropy"] >= tau).float()
            per_token = terms["rkl"] + cfg.loss.fkl_coef * gate * terms["fkl"]
            mask = mb["loss_mask"]
            total += float(torch.where(mask, per_token, 0.0).sum())
            count += float(mask.sum())
    trainer.close()
    return {"trainer_loss": metrics["loss"], "independent": total / count, "moved": moved}


def _worker(rank, world, tmp):
    from megatron_eaopd.cli import run

    summary = run(_cfg(tmp, "run"))
    # no warm-up, so that the first step has a learning rate above 0
    check = _first_step_check(_cfg(tmp, "check", ["optimizer.warmup_iterations=0"]))
    return {"summary": summary, "check": check}


def test_exact_form_trains_and_matches_independent_loss(tmp_path):
    tmp = str(tmp_path)
    r = run_distributed(_worker, 2, tmp, timeout=400)[0]
    assert r["summary"]["iteration"] == 2
    with open(f"{tmp}/run/metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [row for row in rows if row["split"] == "train"]
    assert [row["iteration"] for row in train] == [1, 2]
    for row in train:
        for key in ("loss", "rkl", "fkl", "fkl_gated", "gate", "teacher_entropy",
                    "student_entropy", "grad_norm", "reward", "response_length"):  # fmt: skip
            assert math.isfinite(row[key]), key
        assert row["skipped_updates"] == 0 and row["grad_norm"] > 0
        assert 0 <= row["gate"] <= 1 and row["rkl"] >= 0 and row["fkl"] >= 0
    assert [row["iteration"] for row in rows if row["split"] == "eval"] == [0, 2]
    check = r["check"]
    assert check["moved"], "the optimizer step did not change the student"
    assert check["trainer_loss"] == pytest.approx(check["independent"], rel=1e-5, abs=1e-6)


def test_exact_form_refuses_other_layouts():
    from megatron_eaopd.config import load_config
    from megatron_eaopd.trainer.loop import check_trainer_config

    cfg = load_config(CONFIG, ["loss.objective=eopd_exact", "parallel.teacher.tp=1"])
    with pytest.raises(ValueError, match="parallel.teacher.tp=2"):
        check_trainer_config(cfg, 2)
    cfg = load_config(CONFIG, ["loss.form=exact", "parallel.teacher.pp=2", "parallel.teacher.tp=1",
                               "parallel.student.tp=1"])  # fmt: skip
    with pytest.raises(ValueError, match="parallel.teacher.pp=1"):
        check_trainer_config(cfg, 2)
    check_trainer_config(load_config(CONFIG, ["loss.objective=jsd"]), 2)
    check_trainer_config(load_config(CONFIG, ["loss.objective=eopd_exact"]), 2)


def _pp_worker(rank, world, tmp):
    from megatron_eaopd.cli import run

    # micro-batches of 2 so that the eval's payload scoring splits over the teacher's 2 replicas
    extra = ["parallel.student.tp=1", "parallel.student.pp=2", "parallel.teacher.tp=1",
             "rollout.micro_batch_size=2"]  # fmt: skip
    return run(_cfg(tmp, "pp", extra))


@pytest.mark.slow
def test_exact_form_with_a_pipelined_student(tmp_path):
    """Student TP 1 x PP 2, teacher TP 1: every stage runs the teacher forward, the last stage
    takes the loss; both stages end with the same finite metrics."""
    summaries = run_distributed(_pp_worker, 2, str(tmp_path), timeout=400)
    assert all(s["iteration"] == 2 for s in summaries)
    keys = ("loss", "rkl", "fkl", "gate", "grad_norm")
    assert [summaries[1]["train"][k] for k in keys] == [summaries[0]["train"][k] for k in keys]
    assert all(math.isfinite(summaries[0]["train"][k]) for k in keys)


def test_cuda_graphs_are_refused_without_cuda_and_under_pp():
    from megatron_eaopd.config import load_config
    from megatron_eaopd.trainer import checks

    cfg = load_config(CONFIG, ["rollout.cuda_graphs=true", "parallel.student.pp=2"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="rollout.cuda_graphs needs a CUDA device"):
            checks.check_trainer_config(cfg, 2)
    with mock.patch.object(checks, "_cuda_available", return_value=True):
        with pytest.raises(ValueError, match="needs parallel.student.pp = 1"):
            checks.check_trainer_config(cfg, 2)
        cfg = load_config(CONFIG, ["rollout.cuda_graphs=true", "rollout.use_kv_cache=false"])
        with pytest.raises(ValueError, match="needs rollout.use_kv_cache: true"):
            checks.check_trainer_config(cfg, 2)
        checks.check_trainer_config(load_config(CONFIG, ["rollout.cuda_graphs=true"]), 2)
