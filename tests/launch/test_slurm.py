"""The project's sbatch scripts against a real Slurm (controller + node on loopback).

The fixture installs Debian's Slurm when it is missing (root + apt-get), starts munged, slurmctld
and slurmd in a temporary folder and stops every process by PID at the end, also on failure. If
Slurm cannot be installed or started the tests FAIL with the reason: CI must run them.

Jobs run the stand-in trainer (tests/launch/standin_trainer.py) on 2 processes over gloo, through
both launch variants: one task per GPU (eaopd_per_gpu.sbatch, 2 srun tasks) and one task per node
running torchrun (eaopd_torchrun.sbatch, 2 processes). The checks read the jobs' output: metrics
lines, the checkpoint, the launcher's messages; not only the job state.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import LocalSlurm, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[2]
PER_GPU = ROOT / "launch" / "slurm" / "eaopd_per_gpu.sbatch"
TORCHRUN = ROOT / "launch" / "slurm" / "eaopd_torchrun.sbatch"
# The tiny CPU config drives the stand-in as it will drive the real trainer; the tests override
# the run folder, the length and the checkpoint cadence.
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
METRIC = re.compile(r"^(?:\d+: )?iteration (\d+)/(\d+) \| loss ([0-9.]+) \| world (\d+)$")


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm cluster; everything it started is stopped afterwards."""
    root = tempfile.mkdtemp(prefix="eslurm-", dir="/tmp")  # short: munge socket < 108 bytes
    cluster = LocalSlurm(root)
    try:
        try:
            cluster.start()
        except (SlurmUnavailable, OSError, TimeoutError) as exc:
            pytest.fail(f"cannot start a local Slurm for the launch tests: {exc}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _loopback_env(node: str) -> dict[str, str]:
    """The scripts rendezvous at the first node's name; where it does not resolve (some CI
    containers), point torch and gloo at loopback instead."""
    try:
        socket.gethostbyname(node)
        return {}
    except OSError:
        return {"EAOPD_MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def submit(slurm, script, out: Path, *overrides, sbatch_args=(), env=None) -> int:
    """Submit `script` with the stand-in trainer on 2 processes; logs and run go under `out`."""
    if script == TORCHRUN:  # one task with 2 CPUs; torchrun starts the 2 processes
        layout = ["--nodes=1", "--cpus-per-task=2"]
        env = {"EAOPD_NPROC_PER_NODE": "2", **(env or {})}
    else:  # two tasks, one CPU each
        layout = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    job_env = _loopback_env(slurm.node)
    job_env |= {
        "EAOPD_ENTRY": "tests.launch.standin_trainer",
        "EAOPD_PYTHON": sys.executable,
        "EAOPD_LOG_ROOT": str(out / "logs"),
        **(env or {}),
    }
    return slurm.sbatch(
        # The scripts' placeholders (account, partition) and GPU request are overridden here.
        "--account=test",
        f"--partition={slurm.partition}",
        "--gpus-per-node=0",
        "--job-name=eaopd-test",
        f"--output={out / 'batch.out'}",
        *layout,
        *sbatch_args,
        str(script),
        str(CONFIG),
        f"training.output_dir={out / 'run'}",
        "training.checkpoint_dir=null",
        "training.checkpoint_interval=0",
        *overrides,
        env=job_env,
        cwd=str(out),
    )


def job_dir(out: Path, job_id: int) -> Path:
    """The per-job log folder the batch script creates."""
    return out / "logs" / f"eaopd-test-{job_id}"


def metrics(log: Path) -> list[tuple[int, int, float, int]]:
    """(iteration, total, loss, world) of every metrics line in a log."""
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        match = METRIC.match(line.strip())
        if match:
            it, total, loss, world = match.groups()
            rows.append((int(it), int(total), float(loss), int(world)))
    return rows


def explain(out: Path, job_id: int) -> str:
    """Everything the job wrote, for assertion messages."""
    parts = []
    for path in [out / "batch.out", *sorted(job_dir(out, job_id).glob("*"))]:
        if path.is_file():
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def checkpoint(out: Path) -> dict:
    """The stand-in's checkpoint (its iteration counter)."""
    return json.loads((out / "run" / "checkpoints" / "latest.json").read_text())


def check_metrics(rows, first: int, last: int, total: int) -> None:
    """Consecutive iterations first..last of `total`, world size 2, the stand-in's loss."""
    assert [r[0] for r in rows] == list(range(first, last + 1))
    assert all(r[1] == total and r[3] == 2 for r in rows)
    # loss = sum over ranks of (rank + 1) * iteration = 3 * iteration: the all-reduce ran.
    assert all(r[2] == pytest.approx(3.0 * r[0]) for r in rows)


def test_job_runs_to_completion_with_metrics_and_checkpoint(slurm, tmp_path):
    job = submit(slurm, PER_GPU, tmp_path, "training.iterations=6", "standin.step_seconds=0.05")
    info = slurm.wait_job(job, timeout=60)
    logs = job_dir(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", explain(tmp_path, job)
    log = logs / "attempt0-node0.log"
    assert log.exists(), explain(tmp_path, job)
    check_metrics(metrics(log), 1, 6, 6)
    text = log.read_text()
    assert "0: standin: world_size 2 attempt 0 resume_from 0" in text
    assert "standin: training done at iteration 6" in text
    assert checkpoint(tmp_path)["iteration"] == 6
    assert checkpoint(tmp_path)["reason"] == "end"
    # The per-job log folder records what ran.
    record = (logs / "launch-attempt0.txt").read_text()
    assert "tests.launch.standin_trainer" in record and f"job: {job}" in record
    assert (logs / "config.yaml").read_text() == CONFIG.read_text()
    assert "training step exited with status 0" in (tmp_path / "batch.out").read_text()


def preempt_and_resume(slurm, tmp_path, script, total=24, signal_after=4):
    """Signal the batch shell mid-training; the job must save, requeue and resume exactly."""
    job = submit(
        slurm, script, tmp_path, f"training.iterations={total}", "standin.step_seconds=0.2"
    )
    first_log = job_dir(tmp_path, job) / "attempt0-node0.log"
    deadline = time.monotonic() + 60
    while not (first_log.exists() and len(metrics(first_log)) >= signal_after):
        info = slurm.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING"), explain(tmp_path, job)
        assert time.monotonic() < deadline, f"no progress\n{explain(tmp_path, job)}"
        time.sleep(0.1)
    # What --signal=B:USR1@<secs> does at the deadline: signal the batch shell only.
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))

    info = slurm.wait_job(job, timeout=90)  # requeued jobs go back to PENDING, not final
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", explain(tmp_path, job)
    assert info["Restarts"] == "1", explain(tmp_path, job)

    first = metrics(first_log)
    second_log = job_dir(tmp_path, job) / "attempt1-node0.log"
    assert second_log.exists(), explain(tmp_path, job)
    second = metrics(second_log)
    stopped = first[-1][0]
    assert signal_after <= stopped < total, explain(tmp_path, job)
    check_metrics(first, 1, stopped, total)
    # The next run starts right after the saved iteration: nothing lost, nothing repeated.
    check_metrics(second, stopped + 1, total, total)
    assert sorted(r[0] for r in first + second) == list(range(1, total + 1))

    first_text, second_text = first_log.read_text(), second_log.read_text()
    assert f"preempted (SIGUSR1) after iteration {stopped}, checkpoint saved" in first_text
    assert f"attempt 1 resume_from {stopped}" in second_text
    assert f"training done at iteration {total}" in second_text
    saved = checkpoint(tmp_path)
    assert (saved["iteration"], saved["reason"]) == (total, "end")
    batch = (tmp_path / "batch.out").read_text()  # appended across the requeue
    assert "caught SIGUSR1: forwarding it to the training step" in batch
    assert f"requeueing job {job}" in batch
    assert "attempt 1:" in batch
    return first_text, second_text


def test_preempted_per_gpu_job_saves_requeues_and_resumes(slurm, tmp_path):
    preempt_and_resume(slurm, tmp_path, PER_GPU)


def test_preempted_torchrun_job_saves_requeues_and_resumes(slurm, tmp_path):
    first, _ = preempt_and_resume(slurm, tmp_path, TORCHRUN)
    # torchrun ignores the signal; the node script passed it to both training processes.
    assert re.search(r"SIGUSR1 forwarded to training processes: \d+ \d+", first), first


def test_failed_trainer_fails_the_job_without_requeue(slurm, tmp_path):
    job = submit(
        slurm,
        PER_GPU,
        tmp_path,
        "training.iterations=3",
        env={"EAOPD_ENTRY": "tests.launch.no_such_module"},
    )
    info = slurm.wait_job(job, timeout=60)
    assert info["JobState"] == "FAILED", explain(tmp_path, job)
    assert info["Restarts"] == "0"
    assert "No module named tests.launch.no_such_module" in explain(tmp_path, job)


@pytest.mark.slow
def test_time_limit_signal_requeues_and_resumes(slurm, tmp_path):
    """The real path: --time=1 --signal=B:USR1@50; Slurm signals 10-40 s after the start."""
    total = 120
    job = submit(
        slurm,
        PER_GPU,
        tmp_path,
        f"training.iterations={total}",
        "standin.step_seconds=0.5",
        sbatch_args=("--time=1", "--signal=B:USR1@50"),
    )
    info = slurm.wait_job(job, timeout=300)
    assert info["JobState"] == "COMPLETED", explain(tmp_path, job)
    assert int(info["Restarts"]) >= 1
    rows = []
    for attempt in range(int(info["Restarts"]) + 1):
        rows += metrics(job_dir(tmp_path, job) / f"attempt{attempt}-node0.log")
    assert [r[0] for r in rows] == list(range(1, total + 1)), explain(tmp_path, job)
