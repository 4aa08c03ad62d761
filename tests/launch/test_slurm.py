"""The real trainer (`megatron_eaopd.cli`) launched by the project's sbatch scripts on a real Slurm.

The session's `slurm` fixture (tests/launch/conftest.py) installs Debian's Slurm when it is
missing, starts munged, slurmctld and slurmd on loopback and stops every process by PID at the
end, also on failure. Jobs run configs/tiny-cpu.yaml, made small by dotted overrides, on 2 srun
tasks (eaopd_per_gpu.sbatch, gloo) or 2 torchrun processes (eaopd_torchrun.sbatch); the
teacher and the student warm start are prepared by the first job and loaded from the session's
cache by the others. The checks read what the jobs wrote: the trainer's console metrics per
attempt, metrics.jsonl, the checkpoints, the trainer's status files and the launcher's messages,
not only the job state.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from tests.launch.jobs import (
    CONFIG,
    PER_GPU,
    TORCHRUN,
    attempt_log,
    explain,
    job_dir,
    read,
    submit,
    wait_for_output,
)

TOTAL = 12
# tiny-cpu made small: 12 iterations of 4 prompts x 1 sample (2 optimizer steps each), 12-token
# responses, teacher and student warm start trained for 10 steps each (once, into the session's
# cache), one small evaluation at the end, a checkpoint every 4 iterations. Startup (imports,
# layouts, loading the prepared models) dominates a job: ~25 s on 2 idle cores.
SMALL = (
    f"training.iterations={TOTAL}",
    "training.eval_at_start=false",
    "training.eval_interval=0",
    "training.checkpoint_interval=4",
    "rollout.prompts_per_iteration=4",
    "rollout.samples_per_prompt=1",
    "rollout.mini_batch_size=2",
    "rollout.micro_batch_size=2",
    "rollout.max_response_tokens=12",
    "eval.max_prompts=2",
    "eval.k=1",
    "eval.max_response_tokens=12",
    "eval.plot=false",
    "teacher_prep.iterations=10",
    "teacher_prep.batch_size=8",
    "teacher_prep.warmup_iterations=2",
    "student_prep.iterations=10",
    "student_prep.batch_size=8",
    "student_prep.warmup_iterations=2",
    "task.synthetic.num_train=64",
    "task.synthetic.num_distill=64",
    "task.synthetic.num_eval=4",
    # logging.progress_bars stays true (base.yaml): the trainer must keep bars out of log files.
    "logging.tensorboard=false",
)
JOB_TIMEOUT = 420  # seconds; a job takes ~30-60 s here, more when the machine is busy
# Console line of a train record, rank-prefixed by srun --label (per-GPU script) or torchrun's
# prefix template (torchrun script): "0: [train 3] fkl=2.4, loss=..."
TRAIN_LINE = re.compile(r"^(?:\d+: )?\[train (\d+)\] (.*)$")
# Every line of a job log: a rank label, or in the torchrun variant "node<K>: " for the lines of
# torchrun and the node script; Slurm's own messages ("slurmstepd-<node>: ... STEP 2.0 CANCELLED",
# written when the step is signalled) are not ours to label.
RANK_LABEL = re.compile(r"^(?:\d+: |slurmstepd)")
NODE_OR_RANK_LABEL = re.compile(r"^(?:\d+: |node\d+: |slurmstepd)")
# Non-deterministic metrics, left out when a resumed run is compared with an uninterrupted one.
TIMING = ("time_", "tokens_per_s", "memory_")


def overrides(out: Path, cache: Path) -> list[str]:
    return [
        *SMALL,
        f"training.output_dir={out / 'run'}",
        f"teacher_prep.cache_dir={cache / 'teachers'}",
        f"student_prep.cache_dir={cache / 'students'}",
        f"tokenizer.cache_dir={cache / 'tokenizers'}",
    ]


def train_lines(log: Path) -> list[tuple[int, dict[str, float]]]:
    """(iteration, metrics) of every console train line of a job log."""
    rows = []
    for line in read(log).splitlines():
        match = TRAIN_LINE.match(line.strip())
        if match:
            values = dict(item.split("=", 1) for item in match.group(2).split(", "))
            rows.append((int(match.group(1)), {k: float(v) for k, v in values.items()}))
    return rows


def records(out: Path, split: str) -> list[dict]:
    path = out / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in read(path).splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def saved_iterations(out: Path) -> list[int]:
    """Iterations of the checkpoints in the run's checkpoint folder (each a non-empty folder)."""
    found = []
    for path in sorted((out / "run" / "checkpoints").glob("iter_*")):
        assert path.is_dir() and any(path.iterdir()), f"empty checkpoint {path}"
        found.append(int(path.name.split("_")[1]))
    return found


def latest(out: Path) -> str:
    return read(out / "run" / "checkpoints" / "latest").strip()


def unlabelled(log: Path, label: re.Pattern) -> list[str]:
    """The lines of a job log that do not start with a rank (or node) label."""
    return [line for line in read(log).splitlines() if not label.match(line)]


def statuses(out: Path, job: int, attempt: int) -> list[str]:
    """The trainer's status lines of one attempt (one per rank, from EAOPD_STATUS_DIR)."""
    folder = job_dir(out, job) / f"status-attempt{attempt}"
    return [read(path).strip() for path in sorted(folder.glob("rank*"))]


@pytest.fixture(scope="module")
def plain_job(slurm, trainer_cache, tmp_path_factory):
    """One uninterrupted job (submitted once, read by several tests): (out, job id, info, s)."""
    out = tmp_path_factory.mktemp("plain")
    start = time.monotonic()
    job = submit(slurm, PER_GPU, out, *overrides(out, trainer_cache))
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT)
    return out, job, info, time.monotonic() - start


def test_job_trains_logs_metrics_and_writes_checkpoints(slurm, plain_job, trainer_cache):
    out, job, info, seconds = plain_job
    why = explain(out, job, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "0", why
    log = attempt_log(out, job, 0)
    text = read(log)

    # The trainer's console: one train line per iteration (rank 0), then the final summary.
    lines = train_lines(log)
    assert [it for it, _ in lines] == list(range(1, TOTAL + 1)), why
    for _, metrics in lines:
        for key in ("loss", "fkl", "gate", "teacher_entropy", "student_entropy", "grad_norm"):
            assert math.isfinite(metrics[key]), (key, metrics)
    assert f"done: iteration {TOTAL}/{TOTAL};" in text, why
    assert "preempted" not in text
    # The same iterations in metrics.jsonl, and the evaluation at the end.
    train = records(out, "train")
    assert [r["iteration"] for r in train] == list(range(1, TOTAL + 1)), why
    assert [r["loss"] for r in train] == pytest.approx([m["loss"] for _, m in lines], rel=1e-3)
    assert all(r["skipped_updates"] == 0 and 0 <= r["gate"] <= 1 for r in train)
    assert [r["iteration"] for r in records(out, "eval")] == [TOTAL]

    # Checkpoints every 4 iterations and at the end; the resolved config beside the metrics.
    assert saved_iterations(out) == [4, 8, TOTAL], why
    assert latest(out) == f"iter_{TOTAL:07d}"
    assert f"saved checkpoint {out / 'run' / 'checkpoints' / f'iter_{TOTAL:07d}'}" in text
    # The complete config in the run folder: the top file's keys, its defaults: parent's
    # (base.yaml: loss.fkl_coef), the overrides and the schema's defaults.
    resolved = read(out / "run" / "config.yaml")
    assert f"iterations: {TOTAL}" in resolved and "fkl_coef: 1.0" in resolved, resolved
    assert "name: tiny-cpu" in resolved and "log_interval: 1" in resolved
    # One teacher and one student warm start, prepared by the session's first job (or found in
    # its cache).
    for role in ("teacher", "student"):
        assert len([p for p in (trainer_cache / f"{role}s").iterdir() if p.is_dir()]) == 1, role
        assert f"prepared the {role}" in text or f"using the cached {role}" in text, why

    # The launcher's side: what ran, on how many ranks, and its exit.
    logs = job_dir(out, job)
    record = read(logs / "launch-attempt0.txt")
    assert "-m megatron_eaopd.cli" in record and f"job: {job}" in record
    # The job's log folder: the config merged with its defaults: parent, overrides applied.
    merged = (logs / "config.yaml").read_text()
    assert "fkl_coef: 1.0" in merged and f"iterations: {TOTAL}" in merged, merged
    assert not re.search(r"^defaults:", merged, flags=re.M) and str(CONFIG) in merged
    # How the run ended, from each rank, and the job's exit.
    assert statuses(out, job, 0) == [f"finished 0 {TOTAL}"] * 2
    batch = read(out / "batch.out")
    assert "training step exited with status 0; trainer status: finished" in batch
    assert "the run finished" in batch and "requeueing" not in batch
    # srun --label prefixes every line of the step with its rank; rank 1 ran too.
    assert unlabelled(log, RANK_LABEL) == [], why
    assert any(line.startswith("1: ") for line in text.splitlines())
    assert "\r" not in text and "it/s]" not in text  # progress bars on, but not in a log file
    print(f"\nplain job {job}: {TOTAL} iterations in {seconds:.1f} s from submission")


# slow (~60 s; CI time): in the default set the stand-in trainer goes through the same
# preemption of the torchrun variant on this Slurm (test_slurm_standin.py: SIGTERM to the step,
# save, requeue, resume), and test_train.py stops and resumes the real trainer exactly
@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes_exactly(
    slurm, plain_job, trainer_cache, tmp_path
):
    """A preemption as Slurm does it, on the torchrun variant: SIGTERM to every process of the
    training step (torchrun, the node script, the trainer), not to the batch shell. torchrun
    survives it and lets its workers finish the iteration and save; the batch script sees the
    trainer's status "stopped" and requeues; the next attempt resumes from the saved iteration:
    every iteration exactly once, with the uninterrupted (per-GPU) job's metrics."""
    out = tmp_path
    start = time.monotonic()
    job = submit(slurm, TORCHRUN, out, *overrides(out, trainer_cache))
    first_log, second_log = attempt_log(out, job, 0), attempt_log(out, job, 1)
    wait_for_output(slurm, job, out, lambda: len(train_lines(first_log)) >= 2, JOB_TIMEOUT)
    # What slurmctld sends a preempted job's steps, GraceTime seconds before it kills them.
    slurm.run("scancel", "--signal=TERM", str(job))
    info = slurm.wait_job(job, timeout=2 * JOB_TIMEOUT)  # a requeued job is PENDING, not final
    seconds = time.monotonic() - start
    why = explain(out, job, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "1", why

    # Attempt 0 trained 1..k, saved iteration k on the signal and stopped.
    first, first_text = [it for it, _ in train_lines(first_log)], read(first_log)
    stopped = first[-1]
    assert 2 <= stopped < TOTAL, why
    assert first == list(range(1, stopped + 1)), why
    assert "preempted: checkpoint saved, stopping" in first_text, why
    ckpt = out / "run" / "checkpoints" / f"iter_{stopped:07d}"
    assert f"saved checkpoint {ckpt}" in first_text, why
    assert f"done: iteration {stopped}/{TOTAL} (stopped early)" in first_text, why

    # Attempt 1 loaded that checkpoint and trained k+1..TOTAL: nothing lost, nothing repeated.
    second_text = read(second_log)
    assert f"resumed from {ckpt} (iteration {stopped})" in second_text, why
    second = [it for it, _ in train_lines(second_log)]
    assert second == list(range(stopped + 1, TOTAL + 1)), why
    assert sorted(first + second) == list(range(1, TOTAL + 1))
    assert f"done: iteration {TOTAL}/{TOTAL};" in second_text, why
    assert stopped in saved_iterations(out) and latest(out) == f"iter_{TOTAL:07d}"
    # Both attempts loaded the teacher the first job prepared; the first attempt the student
    # warm start too, the resumed one its own checkpoint (no warm start prepared or loaded).
    assert "using the cached student" in first_text, why
    assert "using the cached student" not in second_text, why
    for role in ("teacher", "student"):
        assert f"using the cached {role}" in first_text, why
        assert len([p for p in (trainer_cache / f"{role}s").iterdir() if p.is_dir()]) == 1, role
    assert "using the cached teacher" in second_text, why

    # metrics.jsonl holds each iteration once, with the uninterrupted job's values: the resume
    # restored weights, optimizer, RNG and the prompt position.
    train = records(out, "train")
    assert [r["iteration"] for r in train] == list(range(1, TOTAL + 1)), why
    plain_out, _, plain_info, _ = plain_job
    if plain_info.get("JobState") == "COMPLETED":
        reference = records(plain_out, "train")
        for ours, theirs in zip(train, reference, strict=True):
            for key, value in theirs.items():
                if key.startswith(TIMING) or not isinstance(value, (int, float)):
                    continue
                assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ours, theirs)

    # The node script passed SIGTERM on (a second copy), torchrun kept its workers alive; the
    # trainer said "stopped" and the batch script requeued; the next attempt ran the same command.
    assert re.search(r"node0: .*SIGTERM forwarded to training processes: \d+ \d+", first_text)
    assert statuses(out, job, 0) == [f"stopped 0 {stopped}"] * 2, why
    assert statuses(out, job, 1) == [f"finished 0 {TOTAL}"] * 2, why
    batch = read(out / "batch.out")  # appended across the requeue
    assert "trainer status: stopped" in batch and f"requeueing job {job}" in batch
    # Every line of both attempts' logs carries a rank label ("node0: " for torchrun's own).
    for text in (first_text, second_text):
        assert [ln for ln in text.splitlines() if not NODE_OR_RANK_LABEL.match(ln)] == [], why
        assert sum(ln.startswith("0: ") for ln in text.splitlines()) > 10, why
        assert "\r" not in text, why  # no progress-bar redraws (torchrun's --tee files)
        assert any(ln.startswith("1: ") for ln in text.splitlines()), why
    assert f"job {job} attempt 1:" in batch
    assert "attempt=1" in read(job_dir(out, job) / "launch-attempt1.txt")
    print(f"\npreempted job {job}: stopped after {stopped}, resumed, {seconds:.1f} s in all")


def test_bad_config_fails_the_torchrun_job_without_requeue(slurm, tmp_path):
    """The torchrun variant with the real trainer: a config error exits 2 before any process
    group exists; torchrun, the node script and the batch script pass the failure on."""
    job = submit(slurm, TORCHRUN, tmp_path, "training.iterations=0", "no_such.key=1")
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT)
    why = explain(tmp_path, job, slurm)
    # The trainer's status 2, not torchrun's 1: the node script took it from the status files.
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", why
    assert info["Restarts"] == "0", why
    assert statuses(tmp_path, job, 0) == ["config_error 2"] * 2, why
    text = read(attempt_log(tmp_path, job, 0))
    assert "eaopd-train:" in text and "no_such" in text, why
    assert "--nproc-per-node=2" in text, why
    assert "the training processes exited 2: exit 2" in text, why
    assert "training step exited with status 2" in read(tmp_path / "batch.out")
    assert "requeueing" not in read(tmp_path / "batch.out")
