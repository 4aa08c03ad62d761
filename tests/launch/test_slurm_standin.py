"""Launch paths checked with the stand-in trainer (tests/launch/standin_trainer.py), where it adds
what the real-trainer jobs of test_slurm.py do not, at a fraction of their cost:

- the torchrun variant preempted mid-training: the node script must pass the signal on to the
  training processes (torchrun ignores it), then requeue and an exact resume; a signal that comes
  after the last iteration changes nothing (no second requeue);
- (slow) a preemption (SIGTERM to the step) that arrives before torchrun has started its workers:
  the stop file remembers it, the workers stop at their first iteration, save, and the job requeues;
- a run stopped early that is not requeued (EAOPD_REQUEUE=0; slow: the budget spent, `scontrol
  requeue` refused) ends FAILED with exit 75, not COMPLETED;
- the CPU-only recipe of docs/slurm.md, submitted exactly as written;
- (slow) the real time-limit path: `--time=1 --signal=B:USR1@50`, Slurm itself sends the signal.

The stand-in does what the trainer does around the model (preemption handler, one gloo
all-reduce per iteration, a metrics line per iteration, a checkpointed iteration counter) and
starts in ~2 s instead of ~25 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eaopd.config.loader import load_yaml_with_defaults
from tests.launch.jobs import (
    PER_GPU,
    ROOT,
    TORCHRUN,
    attempt_log,
    explain,
    job_dir,
    loopback_env,
    read,
    submit,
    wait_for_output,
)

STANDIN = {"EAOPD_ENTRY": "tests.launch.standin_trainer"}
METRIC = re.compile(r"^(?:\d+: )?iteration (\d+)/(\d+) \| loss ([0-9.]+) \| world (\d+)$")


def standin_job(
    slurm, script, out: Path, total: int, step_seconds: float, sbatch_args=(), env=None, extra=()
):
    return submit(
        slurm,
        script,
        out,
        f"training.output_dir={out / 'run'}",
        "training.checkpoint_dir=null",
        "training.checkpoint_interval=0",
        f"training.iterations={total}",
        f"standin.step_seconds={step_seconds}",
        *extra,
        sbatch_args=sbatch_args,
        env={**STANDIN, **(env or {})},
    )


def statuses(out: Path, job: int, attempt: int) -> list[str]:
    """The trainer's status lines of one attempt (one per rank)."""
    folder = job_dir(out, job) / f"status-attempt{attempt}"
    return [read(path).strip() for path in sorted(folder.glob("rank*"))]


def saved(out: Path) -> tuple[int, str]:
    """(iteration, reason) of the stand-in's checkpoint."""
    data = json.loads(read(out / "run" / "checkpoints" / "latest.json"))
    return data["iteration"], data["reason"]


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
    """USR1 to the batch shell mid-training (Slurm's --signal=B:USR1@<secs>): saved, requeued,
    resumed. Then USR1 again while the finished run is still exiting: it stays finished,
    COMPLETED 0 after one restart, not requeued a second time."""
    total, signal_after = 24, 4
    job = standin_job(
        slurm, TORCHRUN, tmp_path, total, step_seconds=0.2, extra=["standin.linger_seconds=120"]
    )
    first_log = attempt_log(tmp_path, job, 0)
    wait_for_output(
        slurm, job, tmp_path, lambda: len(metrics(first_log)) >= signal_after, timeout=120
    )
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    second_log = attempt_log(tmp_path, job, 1)
    done = f"standin: training done at iteration {total}"
    wait_for_output(slurm, job, tmp_path, lambda: done in read(second_log), timeout=180)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))  # after the last iteration
    info = slurm.wait_job(job, timeout=180)
    why = explain(tmp_path, job, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "1", why
    assert "signal while lingering: SIGUSR1" in read(second_log), why
    assert statuses(tmp_path, job, 1) == [f"finished 0 {total}"] * 2, why
    batch = read(tmp_path / "batch.out")
    assert batch.count("requeueing job") == 1, why
    assert "the run finished (SIGUSR1 came too late to stop it)" in batch, why

    first, second = metrics(first_log), metrics(second_log)
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


def _slow_python(tmp_path: Path) -> Path:
    """A python that, when it runs torchrun in attempt 0, waits SLOW_START seconds before it
    starts (one process, no children): torchrun has not started its workers for that long."""
    wrapper = tmp_path / "slowpy"
    code = (
        "import os, sys, time; "
        "slow = 'torch.distributed.run' in sys.argv and os.environ.get('EAOPD_ATTEMPT') == '0'; "
        "time.sleep(float(os.environ.get('SLOW_START', '0')) if slow else 0); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    wrapper.write_text(f'#!/bin/bash\nexec {sys.executable} -c "{code}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.slow  # 25 s; the signal during training stays in the default run
def test_signal_before_the_workers_start_is_remembered(slurm, tmp_path):
    """A preemption's SIGTERM reaches the step while torchrun is still starting (no training
    process exists yet to receive it). The node script writes the stop file; the workers, once
    started, stop after their first iteration, save and report "stopped"; the batch script
    requeues; the next attempt resumes from iteration 1."""
    total = 6
    slow = {"EAOPD_PYTHON": str(_slow_python(tmp_path)), "SLOW_START": "5"}
    job = standin_job(slurm, TORCHRUN, tmp_path, total, step_seconds=0.1, env=slow)
    first_log = attempt_log(tmp_path, job, 0)
    wait_for_output(slurm, job, tmp_path, lambda: "node 0/1 on" in read(first_log), timeout=120)
    slurm.run("scancel", "--signal=TERM", str(job))  # to every process of the step
    info = slurm.wait_job(job, timeout=240)
    why = explain(tmp_path, job, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "1", why
    first_text = read(first_log)
    assert "SIGTERM forwarded to training processes: none (not started yet" in first_text, why
    stop_file = job_dir(tmp_path, job) / "stop-attempt0"
    assert f"0: standin: preempted (stop file {stop_file}) after iteration 1" in first_text, why
    assert statuses(tmp_path, job, 0) == ["stopped 0 1"] * 2, why
    check_metrics(metrics(first_log), 1, 1, total)
    second_log = attempt_log(tmp_path, job, 1)
    assert "attempt 1 resume_from 1" in read(second_log), why
    check_metrics(metrics(second_log), 2, total, total)
    assert saved(tmp_path) == (total, "end")


def _requeue_refused(how: str):
    """(job env, sbatch args, batch-script message) for each way a stopped run stays stopped."""
    return {
        "EAOPD_REQUEUE=0": ({"EAOPD_REQUEUE": "0"}, (), "EAOPD_REQUEUE=0: not requeueing"),
        "budget spent": ({"EAOPD_MAX_REQUEUES": "0"}, (), "(EAOPD_MAX_REQUEUES=0): not requeueing"),
        "scontrol refuses": ({}, ("--no-requeue",), "scontrol requeue"),
    }[how]


@pytest.mark.parametrize(
    "how",
    [
        "EAOPD_REQUEUE=0",
        pytest.param("budget spent", marks=pytest.mark.slow),
        pytest.param("scontrol refuses", marks=pytest.mark.slow),
    ],
)
def test_stopped_run_that_is_not_requeued_fails_with_75(slurm, tmp_path, how):
    """A run stopped early (checkpoint saved, iterations left) that is not requeued must not end
    COMPLETED 0 (an afterok dependency would start on a half-trained model): FAILED, exit 75."""
    env, sbatch_args, message = _requeue_refused(how)
    total = 40
    job = standin_job(
        slurm, PER_GPU, tmp_path, total, step_seconds=0.1, env=env, sbatch_args=sbatch_args
    )
    log = attempt_log(tmp_path, job, 0)
    wait_for_output(slurm, job, tmp_path, lambda: len(metrics(log)) >= 3, timeout=120)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm.wait_job(job, timeout=120)
    why = explain(tmp_path, job, slurm)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", why
    assert info["Restarts"] == "0", why
    stopped = metrics(log)[-1][0]
    assert 3 <= stopped < total and saved(tmp_path) == (stopped, "preempted"), why
    assert statuses(tmp_path, job, 0) == [f"stopped 0 {stopped}"] * 2, why
    batch = read(tmp_path / "batch.out")
    assert message in batch, why
    assert "the run stopped early and was not requeued: exit 75" in batch, why


def cpu_recipe() -> str:
    """The bash block that follows the "cpu-only-recipe" marker in docs/slurm.md."""
    doc = (ROOT / "docs" / "slurm.md").read_text()
    match = re.search(r"<!-- cpu-only-recipe -->\s*```bash\n(.*?)```", doc, flags=re.S)
    assert match, "docs/slurm.md lost its CPU-only recipe (<!-- cpu-only-recipe --> + a bash block)"
    return match.group(1)


# slow (20 s; CI time): the scripts the recipe submits run in the default set through
# test_slurm.py (the real trainer, both variants) and the stand-in tests here
@pytest.mark.slow
def test_cpu_only_recipe_of_the_docs_runs_as_written(slurm, tmp_path):
    """The recipe's text runs unchanged in bash from a folder laid out like the repository (its
    relative paths: launch/, configs/); the environment supplies what a user's shell would
    (account, partition, Slurm's config) and, here, the stand-in trainer as EAOPD_ENTRY."""
    recipe = cpu_recipe()
    assert "sbatch" in recipe and "--gpus" not in recipe.replace("--gpus-per-node=0", "")
    for name in ("launch", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = slurm.env | loopback_env(slurm.node)
    env |= {
        "SBATCH_ACCOUNT": "test",
        "SBATCH_PARTITION": slurm.partition,
        "EAOPD_ROOT": str(ROOT),
        "EAOPD_LOG_ROOT": str(tmp_path / "logs"),
        "EAOPD_PYTHON": sys.executable,
        **STANDIN,
    }
    env.pop("EAOPD_NPROC_PER_NODE", None)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", recipe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job = int(re.search(r"Submitted batch job (\d+)", result.stdout).group(1))
    info = slurm.wait_job(job, timeout=180)
    out = sorted(tmp_path.glob(f"slurm-*-{job}.out"))
    logs = sorted((tmp_path / "logs").glob(f"*-{job}/attempt0-node0.log"))
    why = f"{info}\n" + "\n".join(read(p)[-3000:] for p in [*out, *logs])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Partition"] == slurm.partition and info["Account"] == "test", why
    log = read(logs[0])
    assert "--nproc-per-node=2" in log, why
    rows = metrics(logs[0])
    total = load_yaml_with_defaults(ROOT / "configs" / "tiny-cpu.yaml")["training"]["iterations"]
    assert [r[0] for r in rows] == list(range(1, total + 1)) and {r[3] for r in rows} == {2}, why
    assert os.path.exists(tmp_path / "runs" / "tiny-cpu-slurm" / "checkpoints" / "latest.json")
    print(f"\nCPU recipe job {job}: {time.monotonic() - started:.1f} s")


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
