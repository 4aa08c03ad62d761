"""Stop cleanly before a Slurm time limit: a signal flag, a collective stop decision, a requeue.

Slurm sends a signal some time before a job's limit (``#SBATCH --signal=B:USR1@300``). The batch
script in ``launch/slurm/`` traps it and forwards it to the training processes; here it only sets
a flag. The training loop polls the flag once per iteration through
:meth:`PreemptionHandler.should_stop`, which all-reduces it (MAX) so that every rank stops after
the same iteration even if the signal reached only some of them; then the loop saves a checkpoint
and exits, and the job is requeued (by the batch script, or by :func:`requeue_job` when no such
script runs)::

    handler = PreemptionHandler().install()       # first thing in main(), on every rank
    for iteration in range(start, total):
        train_step(...)
        if handler.should_stop():                 # one all-reduce of one int per call
            save_checkpoint(iteration)
            break

Nothing here touches CUDA unless the process group's backend is NCCL, in which case the flag
tensor lives on the current CUDA device.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_SIGNALS",
    "PreemptionHandler",
    "parse_signals",
    "preemption_signals_blocked",
    "requeue_job",
    "requeue_owned_by_batch_script",
    "slurm_job_id",
]

from megatron_eaopd.signals import DEFAULT_SIGNALS, parse_signals, preemption_signals_blocked

logger = logging.getLogger(__name__)


class PreemptionHandler:
    """Catch the pre-timeout signal and let all ranks agree, collectively, on when to stop.

    Args:
        signals: signals to catch; default ``EAOPD_PREEMPT_SIGNALS`` or SIGUSR1.
        group: process group for :meth:`should_stop`; None: the default (WORLD) group.

    The handler only records the signal (safe at any point of the Python program). Call
    :meth:`install` from the main thread; :meth:`uninstall` restores the previous handlers.
    The signal stays caught after the first delivery, so a repeated signal never kills the
    process.
    """

    def __init__(
        self,
        signals: str | Iterable[str | int | signal.Signals] | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        if signals is None:
            signals = os.environ.get("EAOPD_PREEMPT_SIGNALS") or DEFAULT_SIGNALS
        self.signals = parse_signals(signals)
        self.group = group
        self._received: signal.Signals | None = None
        self._received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._stop_agreed = False

    # -- local state ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._received is None:
            self._received = signal.Signals(signum)
            self._received_at = time.monotonic()

    @property
    def received(self) -> bool:
        """True once this process caught one of the signals (local view, no communication)."""
        return self._received is not None

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first signal caught by this process, if any."""
        return self._received

    @property
    def seconds_since_signal(self) -> float | None:
        """Seconds since this process caught the signal; None if it has not."""
        return None if self._received_at is None else time.monotonic() - self._received_at

    def trigger(self, signum: int = signal.SIGUSR1) -> None:
        """Set the flag as if `signum` had arrived (tests, or a trainer's own stop condition)."""
        self._on_signal(int(signum), None)

    # -- installation --------------------------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Install the handler for each signal; return self. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- the collective decision ---------------------------------------------------------------
    def should_stop(self) -> bool:
        """Whether any rank of the group caught the signal; every rank gets the same answer.

        Collective: every rank of the group must call it at the same point of the loop (e.g.
        once per iteration). Communication: one all-reduce (MAX) of a single int32 per call;
        without an initialised process group, the local flag is returned. Once True it stays
        True without further communication, so ranks never disagree afterwards.
        """
        if self._stop_agreed:
            return True
        local = 1 if self.received else 0
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(self.group)
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if str(backend).lower() == "nccl"
                else torch.device("cpu")
            )
            flag = torch.tensor([local], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            local = int(flag.item())
        self._stop_agreed = bool(local)
        return self._stop_agreed


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """The job to requeue: SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID for arrays, else SLURM_JOB_ID."""
    env = os.environ if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_owned_by_batch_script(env: dict[str, str] | None = None) -> bool:
    """True when the project's sbatch script requeues (it exports EAOPD_REQUEUE_BY=batch)."""
    env = os.environ if env is None else env
    return env.get("EAOPD_REQUEUE_BY", "") == "batch"


def requeue_job(
    job_id: str | None = None, *, dry_run: bool = False, timeout: float = 60.0, force: bool = False
) -> bool:
    """Run ``scontrol requeue JOB`` when running under Slurm; return whether it was requested.

    Call it on one rank (rank 0) after the checkpoint is saved and all ranks passed a barrier:
    requeueing a running job ends it at once. Does nothing (returns False) outside Slurm, when
    scontrol is missing, or when the project's batch script owns the requeue
    (``EAOPD_REQUEUE_BY=batch``) unless `force`. `dry_run` logs the command instead of running it.
    """
    job_id = job_id or slurm_job_id()
    if job_id is None:
        logger.info("not running under Slurm (no SLURM_JOB_ID): nothing to requeue")
        return False
    if requeue_owned_by_batch_script() and not force:
        logger.info("the batch script requeues job %s after the trainer exits", job_id)
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        logger.warning("scontrol not found: cannot requeue job %s", job_id)
        return False
    cmd = [scontrol, "requeue", str(job_id)]
    if dry_run:
        logger.info("would run: %s", " ".join(cmd))
        return True
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        logger.warning("%s failed (%d): %s", " ".join(cmd), result.returncode, result.stderr)
        return False
    logger.info("requeued Slurm job %s", job_id)
    return True
