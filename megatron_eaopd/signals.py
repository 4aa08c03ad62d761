"""Process-level signal helpers shared by checkpointing and the trainer (a low layer: it imports
nothing else of the project).

* :data:`DEFAULT_SIGNALS`, :func:`parse_signals`: the pre-timeout (preemption) signals;
* :func:`preemption_signals_blocked`: block them while helper processes start, so a signal that
  Slurm fans out to every process of a step cannot kill a checkpoint writer.

:mod:`megatron_eaopd.trainer.preemption` builds the stop-and-requeue logic on top of these.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator

__all__ = ["DEFAULT_SIGNALS", "parse_signals", "preemption_signals_blocked"]

#: Signals caught when none are given: ``EAOPD_PREEMPT_SIGNALS`` (comma list, e.g. "USR1,TERM"),
#: else SIGUSR1, the signal the project's sbatch scripts ask Slurm for and forward.
DEFAULT_SIGNALS = ("SIGUSR1",)


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
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, parse_signals(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
