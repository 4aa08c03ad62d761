"""Submitting the project's sbatch scripts to the test cluster (tests/launch/slurm_cluster.py) and
reading what the jobs wrote."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_GPU = ROOT / "launch" / "slurm" / "eaopd_per_gpu.sbatch"
TORCHRUN = ROOT / "launch" / "slurm" / "eaopd_torchrun.sbatch"
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
JOB_NAME = "eaopd-test"


def loopback_env(node: str) -> dict[str, str]:
    """The scripts rendezvous at the first node's name; where it does not resolve (some CI
    containers), point torch and gloo at loopback instead."""
    try:
        socket.gethostbyname(node)
        return {}
    except OSError:
        return {"EAOPD_MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def submit(slurm, script: Path, out: Path, *overrides: str, sbatch_args=(), env=None) -> int:
    """Submit `script` with configs/tiny-cpu.yaml and `overrides` on 2 processes on the one node:
    per-GPU script: 2 srun tasks of 1 CPU; torchrun script: 1 task of 2 CPUs running torchrun
    with 2 processes. The batch output goes to out/batch.out, the job's logs under out/logs.
    `env` adds to the job's environment (EAOPD_ENTRY picks another trainer)."""
    if script == TORCHRUN:
        layout = ["--nodes=1", "--cpus-per-task=2"]
        env = {"EAOPD_NPROC_PER_NODE": "2", **(env or {})}
    else:
        layout = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    job_env = loopback_env(slurm.node)
    job_env |= {
        "EAOPD_ENTRY": "megatron_eaopd.cli",
        "EAOPD_PYTHON": sys.executable,
        "EAOPD_LOG_ROOT": str(out / "logs"),
        **(env or {}),
    }
    return slurm.sbatch(
        # The scripts' placeholders (account, partition) and GPU request are overridden here.
        "--account=test",
        f"--partition={slurm.partition}",
        "--gpus-per-node=0",
        f"--job-name={JOB_NAME}",
        f"--output={out / 'batch.out'}",
        *layout,
        *sbatch_args,
        str(script),
        str(CONFIG),
        *overrides,
        env=job_env,
        cwd=str(out),
    )


def job_dir(out: Path, job_id: int) -> Path:
    """The per-job log folder the batch script creates."""
    return out / "logs" / f"{JOB_NAME}-{job_id}"


def attempt_log(out: Path, job_id: int, attempt: int) -> Path:
    """The training step's output of one attempt (node 0)."""
    return job_dir(out, job_id) / f"attempt{attempt}-node0.log"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def explain(out: Path, job_id: int, slurm=None) -> str:
    """Everything the job wrote (and the daemons' logs), for assertion messages."""
    parts = []
    for path in [out / "batch.out", *sorted(job_dir(out, job_id).glob("*"))]:
        if path.is_file():
            parts.append(f"--- {path.name} ---\n{read(path)[-4000:]}")
    if slurm is not None:
        parts.append(f"--- job ---\n{slurm.job(job_id)}\n{slurm.daemon_logs()}")
    return "\n".join(parts)


WAITING_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "RESIZING"}
)


def wait_for_output(
    slurm, job_id: int, out: Path, ready: Callable[[], bool], timeout: float
) -> None:
    """Wait until `ready()` while the job is pending, running or passing between the two; fail
    with its output if not.

    A requeued job goes RUNNING -> COMPLETING -> PENDING (some Slurm versions show REQUEUED on the
    way), so those transient states are waited through, not taken for the end of the job."""
    deadline = time.monotonic() + timeout
    while not ready():
        state = slurm.job(job_id).get("JobState")
        if state not in WAITING_STATES:
            raise AssertionError(f"job {job_id} is {state}\n{explain(out, job_id, slurm)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress in {timeout:.0f}s\n{explain(out, job_id, slurm)}")
        time.sleep(0.1)


# `scontrol -o show job` (fields of interest) in the batch shell's SIGTERM handler, as a local
# Slurm 22.05 printed them: while a job ends it is COMPLETING whatever the cause.
SHOW_JOB = {
    "running": "JobState=RUNNING Reason=None PreemptTime=None",
    "scancel": "JobState=COMPLETING Reason=None PreemptTime=None",
    "preempted": "JobState=COMPLETING Reason=None PreemptTime=2026-12-02T00:11:39",
    "time limit": "JobState=COMPLETING Reason=TimeLimit PreemptTime=None",
    "cancelled": "JobState=CANCELLED Reason=None PreemptTime=None",
    # free text printed later on the line (Comment=, WorkDir=) must not count
    "scancel, comment": "JobState=COMPLETING Reason=None PreemptTime=None "
    "Comment=resubmit Reason=TimeLimit PreemptTime=never",
    "unknown": "",
    # a PreemptTime before this run's StartTime is an earlier run's (Slurm 22.05 resets it on a
    # requeue, measured; other versions might not): a scancel all the same
    "scancel, earlier preemption": "JobState=COMPLETING Reason=None "
    "StartTime=2026-12-02T02:57:01 PreemptTime=2026-12-02T02:56:44",
    "preempted, same second as the start": "JobState=COMPLETING Reason=None "
    "StartTime=2026-12-02T02:57:01 PreemptTime=2026-12-02T02:57:01",
    # PreemptMode=CANCEL, GraceTime=20, as Slurm 22.05 printed them at the batch shell's SIGTERM:
    # the grace time ran out (PreemptTime moves to the kill time) / a scancel 3 s into it
    "preempted, grace time over": "JobState=COMPLETING Reason=None StartTime=2026-12-02T03:06:25 "
    "EndTime=2026-12-02T03:07:08 PreemptTime=2026-12-02T03:07:08",
    "scancel during a grace time": "JobState=COMPLETING Reason=None StartTime=2026-12-02T03:05:06 "
    "EndTime=2026-12-02T03:05:12 PreemptTime=2026-12-02T03:05:09",
}
#: The SHOW_JOB cases of a cancelled job (not to be requeued).
CANCELLED = ("scancel", "cancelled", "scancel, comment", "scancel, earlier preemption",
             "scancel during a grace time")  # fmt: skip
#: PreemptMode=REQUEUE, as Slurm 22.05 printed it at the SIGTERM of run 0 (SLURM_RESTART_COUNT=0):
#: Slurm has requeued the job already (Restarts=1), no PreemptTime is printed, and the job looks
#: like a scancel to a rule that reads only JobState, Reason and PreemptTime.
REQUEUED_BY_SLURM = "JobState=COMPLETING Reason=None Restarts=1 StartTime=2026-12-02T02:57:40"
