"""The README's main job (configs/tiny-cpu.yaml: 2 gloo ranks, data-parallel, the exact form) at
reduced size, launched as the README launches it: torchrun, exit status 0, the before/after table
on stdout, the curves PNG and the metric rows in the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.trainer.common import ROOT, TINY_RUN

MAIN = os.path.join(ROOT, "configs", "tiny-cpu.yaml")


def test_main_job_at_reduced_size(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "megatron_eaopd.cli", "--config", MAIN, *TINY_RUN,
        "student_prep.iterations=3", "student_prep.batch_size=8",
        "rollout.prompts_per_iteration=4", "rollout.mini_batch_size=2",
        "rollout.micro_batch_size=4",
        "optimizer.warmup_iterations=4",  # at most the run's 2 x 2 optimizer steps
        "eval.save_samples=0",
        f"training.output_dir={out}",
        f"teacher_prep.cache_dir={tmp_path}/teachers",
        f"student_prep.cache_dir={tmp_path}/students",
        f"tokenizer.cache_dir={tmp_path}/tokenizers",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the before/after table: teacher, the student before and after, the change
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    firsts = [line.split("|")[1].strip() for line in lines]
    for row in ("teacher", "student, iteration 0", "student, iteration 2", "change"):
        assert row in firsts, proc.stdout[-2000:]
    assert (out / "eval_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "eval_samples").exists()  # eval.save_samples=0: none

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    splits = {}
    for row in rows:
        splits.setdefault(row["split"], []).append(row)
    assert [r["iteration"] for r in splits["teacher"]] == [0]
    assert [r["iteration"] for r in splits["eval"]] == [0, 2]
    assert [r["iteration"] for r in splits["train"]] == [1, 2]
    for row in splits["teacher"] + splits["eval"]:  # eval.k=2 in TINY_RUN (the config: 8)
        assert 0 <= row["mean/pass@1"] <= row["mean/pass@2"] <= 1
        assert row["mean/avg@2"] == row["mean/pass@1"]
    # the exact form: full-vocabulary reverse KL, no sampled policy-gradient term
    for row in splits["train"]:
        assert "rkl" in row and "pg_loss" not in row
