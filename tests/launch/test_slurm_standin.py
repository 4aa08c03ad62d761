"""Launch paths checked with the stand-in trainer (tests/launch/standin_trainer.py), where it adds
what the real-trainer jobs of test_slurm.py do not, at a fraction of their cost:

- the torchrun variant preempted mid-training: the node script must pass the signal on to the
  training processes (torchrun ignores it), then requeue and an exact resume;
- (slow) the real time-limit path: `--time=1 --signal=B:USR1@50`, Slurm itself sends the signal.

The stand-in does what the trainer does around the model (preemption handler, one gloo
all-reduce per iteration, a metrics line per iteration, a checkpointed iteration counter) and
starts in ~2 s instead of ~25 s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.launch.jobs import (
    PER_GPU,
    TORCHRUN,
    attempt_log,
    explain,
    read,
    submit,
    wait_for_output,
)

STANDIN = {"EAOPD_ENTRY": "tests.launch.standin_trainer"}
METRIC = re.compile(r"^(?:\d+: )?iteration (\d+)/(\d+) \| loss ([0-9.]+) \| world (\d+)$")


def standin_job(slurm, script, out: Path, total: int, step_seconds: float, sbatch_args=()):
    return submit(
        slurm,
        script,
        out,
        f"training.output_dir={out / 'run'}",
        "training.checkpoint_dir=null",
        "training.checkpoint_interval=0",
        f"training.iterations={total}",
        f"standin.step_seconds={step_seconds}",
        sbatch_args=sbatch_args,
        env=STANDIN,
    )


def metrics(log: Path) -> list[tuple[int, int, float, int]]:
    """(iteration, total, loss, world) of every stand-in metrics line in a log."""
    rows = []
    for line in read(log).splitlines():
        match = METRIC.match(line.strip())
        if match:
            it, total, loss, world = match.groups()
            rows.append((int(it), int(total), float(loss), int(world)))
    return rows


def check_metrics(rows, first: int, last: int, total: int) -> None:
    """Consecutive iterations first..last of `total`, world size 2, the stand-in's loss."""
    assert [r[0] for r in rows] == list(range(first, last + 1))
    assert all(r[1] == total and r[3] == 2 for r in rows)
    # loss = sum over ranks of (rank + 1) * iteration = 3 * iteration: the all-reduce ran.
    assert all(r[2] == pytest.approx(3.0 * r[0]) for r in rows)


def test_preempted_torchrun_job_forwards_the_signal_requeues_and_resumes(slurm, tmp_path):
    total, signal_after = 24, 4
    job = standin_job(slurm, TORCHRUN, tmp_path, total, step_seconds=0.2)
    first_log = attempt_log(tmp_path, job, 0)
    wait_for_output(
        slurm, job, tmp_path, lambda: len(metrics(first_log)) >= signal_after, timeout=120
    )
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm.wait_job(job, timeout=180)
    why = explain(tmp_path, job, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "1", why

    first, second = metrics(first_log), metrics(attempt_log(tmp_path, job, 1))
    stopped = first[-1][0]
    assert signal_after <= stopped < total, why
    check_metrics(first, 1, stopped, total)
    check_metrics(second, stopped + 1, total, total)
    first_text = read(first_log)
    # torchrun ignores the signal; the node script passed it to both training processes.
    assert re.search(r"SIGUSR1 forwarded to training processes: \d+ \d+", first_text), why
    assert f"preempted (SIGUSR1) after iteration {stopped}, checkpoint saved" in first_text
    assert f"attempt 1 resume_from {stopped}" in read(attempt_log(tmp_path, job, 1)), why
    saved = json.loads(read(tmp_path / "run" / "checkpoints" / "latest.json"))
    assert (saved["iteration"], saved["reason"]) == (total, "end")
    assert f"requeueing job {job}" in read(tmp_path / "batch.out")


@pytest.mark.slow
def test_time_limit_signal_requeues_and_resumes(slurm, tmp_path):
    """The real path: --time=1 --signal=B:USR1@50; Slurm signals 10-40 s after the start."""
    total = 120
    job = standin_job(
        slurm, PER_GPU, tmp_path, total, 0.5, sbatch_args=("--time=1", "--signal=B:USR1@50")
    )
    info = slurm.wait_job(job, timeout=300)
    why = explain(tmp_path, job, slurm)
    assert info["JobState"] == "COMPLETED", why
    assert int(info["Restarts"]) >= 1, why
    rows = []
    for attempt in range(int(info["Restarts"]) + 1):
        rows += metrics(attempt_log(tmp_path, job, attempt))
    assert [r[0] for r in rows] == list(range(1, total + 1)), why
