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

A signal can be lost: the launcher may catch it before the training processes exist, or while
they still ignore it (they start with it ignored so that it cannot kill them before the handler
is installed). The launcher therefore also creates a *stop file* (``EAOPD_STOP_FILE``), which
:meth:`PreemptionHandler.should_stop` checks once per call: a signal that arrived too early is
remembered there and acted on at the first iteration.

How the run ended goes back to the launcher through :func:`write_exit_status`: one line per
rank in ``EAOPD_STATUS_DIR`` (set by the batch scripts), ``finished 0``, ``stopped 0`` (saved a
checkpoint and stopped before the last iteration: requeue it), ``config_error 2`` or
``failed 1``. torchrun replaces its workers' exit statuses with 1; these files keep them.

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
from datetime import datetime

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_SIGNALS",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_FINISHED",
    "EXIT_STOPPED",
    "PreemptionHandler",
    "parse_signals",
    "preemption_signals_blocked",
    "requeue_job",
    "requeue_owned_by_batch_script",
    "slurm_job_id",
    "write_exit_status",
]

from megatron_eaopd.signals import DEFAULT_SIGNALS, parse_signals, preemption_signals_blocked

logger = logging.getLogger(__name__)

#: Exit statuses of the trainer and of the project's batch scripts (docs/slurm.md). The trainer
#: exits 0 both when it finished and when it stopped early after a checkpoint; its status file
#: (:func:`write_exit_status`) tells the two apart. A batch script exits EXIT_STOPPED when the run
#: stopped early and was not requeued (requeueing off, the budget spent, ``scontrol requeue``
#: failed): 75 is EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 75
STATUSES = ("finished", "stopped", "config_error", "failed")


class PreemptionHandler:
    """Catch the pre-timeout signal and let all ranks agree, collectively, on when to stop.

    Args:
        signals: signals to catch; default ``EAOPD_PREEMPT_SIGNALS``, else SIGUSR1 and SIGTERM.
        group: process group for :meth:`should_stop`; None: the default (WORLD) group.
        stop_file: a path whose existence counts as a received signal (checked by
            :meth:`should_stop`); default ``EAOPD_STOP_FILE``; None or "": no stop file.

    The handler only records the signal (safe at any point of the Python program). Call
    :meth:`install` from the main thread; :meth:`uninstall` restores the previous handlers.
    The signal stays caught after the first delivery, so a repeated signal never kills the
    process.
    """

    def __init__(
        self,
        signals: str | Iterable[str | int | signal.Signals] | None = None,
        group: dist.ProcessGroup | None = None,
        stop_file: str | os.PathLike | None = None,
    ):
        if signals is None:
            signals = os.environ.get("EAOPD_PREEMPT_SIGNALS") or DEFAULT_SIGNALS
        self.signals = parse_signals(signals)
        self.group = group
        if stop_file is None:
            stop_file = os.environ.get("EAOPD_STOP_FILE") or None
        self.stop_file = os.fspath(stop_file) if stop_file else None
        self._stop_file_seen = False
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
        """True once this process caught one of the signals or found the stop file (local view,
        no communication; the stop file is looked at by :meth:`poll_stop_file`)."""
        return self._received is not None or self._stop_file_seen

    def poll_stop_file(self) -> bool:
        """Look for the stop file (one ``stat``); True once it was seen. Never raises."""
        if not self._stop_file_seen and self.stop_file is not None:
            try:
                self._stop_file_seen = os.path.exists(self.stop_file)
            except OSError:  # an unreachable file system must not stop training
                return False
            if self._stop_file_seen and self._received_at is None:
                self._received_at = time.monotonic()
        return self._stop_file_seen

    @property
    def reason(self) -> str | None:
        """Why this process wants to stop: the signal's name, "stop file PATH", or None."""
        if self._received is not None:
            return self._received.name
        if self._stop_file_seen:
            return f"stop file {self.stop_file}"
        return None

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

    def uninstall(self, ignore: bool = False) -> None:
        """Restore the handlers that were in place before :meth:`install`; with ``ignore``,
        ignore the signals from now on instead.

        Call it with ``ignore=True`` when the run is over and the process is about to exit: Slurm
        delivers copies of a signal to every process of a step, a launcher forwards one more, and
        a late copy must not kill a process that already saved and is shutting down (Python
        resets its own handlers to the default action, which ends the process, at shutdown;
        an ignored signal stays ignored)."""
        for sig, previous in self._previous.items():
            if ignore:
                signal.signal(sig, signal.SIG_IGN)
            else:
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
        without an initialised process group, the local flag is returned. Each call also looks
        for the stop file (one ``stat``), so one rank that sees it stops them all. Once True it
        stays True without further communication, so ranks never disagree afterwards.
        """
        if self._stop_agreed:
            return True
        self.poll_stop_file()
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


def _attempt() -> int:
    """This run's restart count (the batch scripts' EAOPD_ATTEMPT, else SLURM_RESTART_COUNT)."""
    value = os.environ.get("EAOPD_ATTEMPT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
    return int(value) if value.isdigit() else 0


def job_end(job_id: str, scontrol: str = "scontrol", attempt: int | None = None) -> str:
    """Why ``job_id`` is ending, from ``scontrol -o show job`` (measured on Slurm 22.05; while a
    job ends scontrol shows JobState=COMPLETING whatever the cause):

    - ``"requeued"``: Slurm has requeued the job itself, Restarts > `attempt` (this run's
      restart count, default from the environment). PreemptMode=REQUEUE does so before the
      job's processes get SIGTERM; the job then shows COMPLETING, Reason=None, no PreemptTime.
    - ``"cancelled"``: CANCELLED, or COMPLETING with Reason=None and no PreemptTime of this run
      (a PreemptTime before this run's StartTime would be an earlier run's), or one that ended
      (EndTime) more than a second after PreemptTime: a scancel during a preemption's GraceTime
      (a preemption that kills the job sets PreemptTime to the kill time, = EndTime).
    - ``"other"``: running (a ``--signal`` lead time, a preemption's GraceTime), preempted
      (PreemptTime), the time limit (Reason=TimeLimit), or scontrol could not tell.
    """
    attempt = _attempt() if attempt is None else attempt
    try:
        result = subprocess.run([scontrol, "-o", "show", "job", str(job_id)],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "other"
    fields: dict[str, str] = {}
    for word in result.stdout.split():  # the first of each key: free text (Comment=, WorkDir=)
        if "=" in word:  # comes later on the line and may hold 'Reason=...' words
            key, value = word.split("=", 1)
            fields.setdefault(key, value)
    restarts = fields.get("Restarts", "")
    if restarts.isdigit() and int(restarts) > attempt:
        return "requeued"
    state = fields.get("JobState")
    if state == "CANCELLED":
        return "cancelled"
    if state == "COMPLETING" and fields.get("Reason") == "None":
        preempt, start = fields.get("PreemptTime", "None"), fields.get("StartTime", "")
        if preempt == "None" or (preempt[:1].isdigit() and start[:1].isdigit() and preempt < start):
            return "cancelled"
        try:
            late = (datetime.fromisoformat(fields.get("EndTime", ""))
                    - datetime.fromisoformat(preempt)).total_seconds()  # fmt: skip
        except ValueError:
            late = 0.0
        if late > 1:
            return "cancelled"
    return "other"


def requeue_job(
    job_id: str | None = None, *, dry_run: bool = False, timeout: float = 60.0, force: bool = False
) -> bool:
    """Run ``scontrol requeue JOB`` when running under Slurm; return whether it was requested.

    Call it on one rank (rank 0) after the checkpoint is saved and all ranks passed a barrier:
    requeueing a running job ends it at once. Does nothing (returns False) outside Slurm, when
    scontrol is missing, when the job was cancelled (``scancel`` sends SIGTERM, which stops the
    run like a preemption; a requeue would bring it back: ``job_end``), or when the
    project's batch script owns the requeue (``EAOPD_REQUEUE_BY=batch``) unless `force`.
    `dry_run` logs the command instead of running it.
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
    end = job_end(job_id, scontrol)
    if end == "cancelled":  # scancel's SIGTERM stopped the run: do not revive it
        logger.warning("job %s was cancelled (no preemption, no time limit): not requeueing it",
                       job_id)  # fmt: skip
        return False
    if end == "requeued":  # PreemptMode=REQUEUE: Slurm requeued it before the signal
        logger.info("Slurm has already requeued job %s", job_id)
        return True
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


def write_exit_status(
    status: str,
    code: int,
    iteration: int | None = None,
    directory: str | os.PathLike | None = None,
    rank: int | None = None,
) -> str | None:
    """Record how this rank ended for the launcher: the line ``STATUS CODE [ITERATION]`` in
    ``<directory>/rank<RANK>`` (default: ``EAOPD_STATUS_DIR``; nothing is written without one).

    ``status`` is one of ``finished``, ``stopped`` (checkpoint saved, iterations remain),
    ``config_error``, ``failed``; ``code`` the exit status the process is about to return.
    Written atomically (temporary file, rename). Never raises: a status that cannot be written
    is logged, and the launcher then falls back on the exit status. Returns the path written.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown exit status {status!r}; expected one of {STATUSES}")
    directory = directory if directory is not None else os.environ.get("EAOPD_STATUS_DIR")
    if not directory:
        return None
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    path = os.path.join(os.fspath(directory), f"rank{rank}")
    line = f"{status} {int(code)}" + (f" {int(iteration)}" if iteration is not None else "")
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("cannot write the exit status %r to %s: %s", line, path, err)
        return None
    return path
