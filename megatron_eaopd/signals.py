"""Process-level signal helpers shared by checkpointing and the trainer (a low layer: it imports
nothing else of the project).

* :data:`DEFAULT_SIGNALS`, :func:`parse_signals`: the pre-timeout (preemption) signals;
* :func:`preemption_signals_blocked`: block them while helper processes start, so a signal that
  Slurm fans out to every process of a step cannot kill a checkpoint writer;
* :func:`install_orphan_guard`: helper processes started from then on (forked checkpoint writers,
  the spawned multiprocessing manager of dist_checkpointing) die with the process that started
  them, even when it is killed with SIGKILL and runs no cleanup.

:mod:`megatron_eaopd.trainer.preemption` builds the stop-and-requeue logic on top of these.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "DEFAULT_SIGNALS",
    "die_with_parent",
    "install_orphan_guard",
    "parse_signals",
    "preemption_signals_blocked",
]

#: Signals caught when none are given: ``EAOPD_PREEMPT_SIGNALS`` (comma list, e.g. "USR1,TERM"),
#: else SIGUSR1 (what the project's sbatch scripts ask Slurm to send before the time limit) and
#: SIGTERM (what Slurm sends to a job's steps when it preempts the job, GraceTime seconds before
#: killing it, and what ``scancel`` sends). Each of them leads to a checkpoint and a clean stop.
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


def parse_signals(spec: str | Iterable[str | int | signal.Signals]) -> tuple[signal.Signals, ...]:
    """Turn "USR1,TERM" / ["SIGUSR1", 15] into signal.Signals values; ValueError on a bad name."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            name = item.strip().upper()
            if not name:
                continue
            if name.isdigit():
                out.append(signal.Signals(int(name)))
                continue
            name = name if name.startswith("SIG") else "SIG" + name
            try:
                out.append(signal.Signals[name])
            except KeyError:
                raise ValueError(f"unknown signal {item!r}") from None
        else:
            out.append(signal.Signals(item))
    if not out:
        raise ValueError(f"no signal in {spec!r}")
    return tuple(dict.fromkeys(out))


@contextlib.contextmanager
def preemption_signals_blocked(
    signals: str | Iterable[str | int | signal.Signals] | None = None,
) -> Iterator[None]:
    """Block the preemption signals in the calling thread while the block runs; a signal that
    arrives meanwhile stays pending and is delivered when it ends (nothing is lost).

    Wrap anything that starts helper processes, e.g. a checkpoint save: megatron's
    dist_checkpointing starts a multiprocessing manager (spawned, so without our handler) on its
    first save and keeps it for later saves. Slurm delivers a step's signal to every process of
    the step (srun forwards it to all of them), and SIGUSR1's default action ends a process, so
    an unprotected manager dies and the next save fails with BrokenPipeError. Processes started
    inside the block inherit the blocked mask (fork and exec keep it) and never see the signal.

    Args:
        signals: as for :class:`PreemptionHandler` (default ``EAOPD_PREEMPT_SIGNALS`` or SIGUSR1).
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to block
        yield
        return
    if signals is None:
        signals = os.environ.get("EAOPD_PREEMPT_SIGNALS") or DEFAULT_SIGNALS
    wanted = parse_signals(signals)
    # multiprocessing's resource tracker, started by the first spawn of a process (the
    # checkpoint writer's manager), unblocks SIGINT and SIGTERM in this thread after starting
    # (pthread_sigmask(SIG_UNBLOCK), not a restore): inside the block that would leave later
    # helpers open to SIGTERM. Started first, it is never started inside the block.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---------------------------------------------------------------------------------------------
# Helper processes die with their parent

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.2
_guard_lock = threading.Lock()
_guard_installed = False


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) for the calling process; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    _kill_self()


def die_with_parent(parent_pid: int, started_by_main_thread: bool) -> None:
    """Call in a freshly started child: end it (SIGKILL) as soon as ``parent_pid`` ends.

    Linux's parent-death signal fires when the parent THREAD that created the child exits, not
    the parent process: it is exact only for children created by the parent's main thread (whose
    exit ends the process), so it is used for those. A child created from another thread gets a
    daemon thread instead that polls ``os.getppid()`` every 0.2 s (a dead parent's children are
    re-parented). Either way, a parent that died before this call is noticed at once.
    """
    if started_by_main_thread and _set_parent_death_signal():
        if os.getppid() != parent_pid:  # died before prctl took effect
            _kill_self()
        return
    if os.getppid() != parent_pid:
        _kill_self()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _die_with_requester(parent_pid: int) -> None:
    """Call in a fresh "forkserver" child: end it (SIGKILL) as soon as ``parent_pid``, the
    process that asked the fork server for it, ends. Its OS parent is the server (which outlives
    that process briefly and never kills its children), so neither the parent-death signal nor
    ``os.getppid()`` can tell; multiprocessing's parent sentinel can: a pipe from the requesting
    process that reads EOF once it has died. A daemon thread waits on it."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.pid != parent_pid or not parent.is_alive():
        _kill_self()

    def watch():
        wait([parent.sentinel])
        _kill_self()

    threading.Thread(target=watch, daemon=True).start()


class _DiesWithParent:
    """Picklable wrapper of a spawned or fork-server process's target: guard first, then run the
    target."""

    def __init__(self, target: Callable, parent_pid: int, started_by_main_thread: bool,
                 start_method: str = "spawn"):  # fmt: skip
        self.target = target
        self.parent_pid = parent_pid
        self.started_by_main_thread = started_by_main_thread
        self.start_method = start_method

    def __call__(self, *args, **kwargs):
        if self.start_method == "forkserver":
            _die_with_requester(self.parent_pid)
        else:
            die_with_parent(self.parent_pid, self.started_by_main_thread)
        return self.target(*args, **kwargs)


def _after_fork_in_child(parent_pid: int) -> None:
    # os.fork keeps only the forking thread, which is this child's main thread now; whether the
    # parent forked from its main thread was recorded before the fork.
    die_with_parent(parent_pid, _fork_state.from_main)


class _ForkState(threading.local):
    parent_pid = 0
    from_main = True


_fork_state = _ForkState()


def _before_fork() -> None:
    _fork_state.parent_pid = os.getpid()
    _fork_state.from_main = threading.current_thread() is threading.main_thread()


def install_orphan_guard() -> None:
    """From now on, every helper process this process starts dies when this process dies.

    Idempotent; call it before starting helpers (``models.checkpoint.save_checkpoint`` does,
    around megatron's ``dist_checkpointing.save``). Covers:

    * ``os.fork`` children (multiprocessing's "fork" context, e.g. dist_checkpointing's
      per-bucket writer processes): an ``os.register_at_fork`` hook runs :func:`die_with_parent`
      in the child; the hook is inherited, so their own forks are covered too;
    * "spawn" / "forkserver" children of ``multiprocessing`` started with a ``target`` (e.g.
      the ``Manager`` that dist_checkpointing starts on its first save and keeps):
      ``BaseProcess.start`` wraps the target so the child runs :func:`die_with_parent` first
      (a fork-server child, whose OS parent is the server, watches this process through
      multiprocessing's parent sentinel instead; "forkserver" is Python 3.14's default).

    Not covered: programs started with ``subprocess`` (they run no Python hook). The resource
    tracker multiprocessing starts this way exits by itself once every process holding its pipe
    (this one, the manager) is gone.
    """
    global _guard_installed
    with _guard_lock:
        if _guard_installed:
            return
        import multiprocessing.process as mp_process

        os.register_at_fork(
            before=_before_fork,
            after_in_child=lambda: _after_fork_in_child(_fork_state.parent_pid),
        )
        original_start = mp_process.BaseProcess.start

        def start(self):
            target, method = self._target, getattr(self, "_start_method", None)
            if method is None:  # a default-context Process: the default start method
                import multiprocessing

                method = multiprocessing.get_start_method()
            if target is not None and method != "fork" and not isinstance(target, _DiesWithParent):
                main = threading.current_thread() is threading.main_thread()
                self._target = _DiesWithParent(target, os.getpid(), main, method)
            return original_start(self)

        mp_process.BaseProcess.start = start
        _guard_installed = True
