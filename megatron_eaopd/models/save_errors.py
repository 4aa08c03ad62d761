"""Why a checkpoint save cannot or did not happen, in one line a user can act on.

A run that fills its disk used to print a traceback per rank naming torch's zip writer
(``unexpected pos 704 vs 598``) or ``CheckpointException ranks:dict_keys([])``, never the disk.
Before a save, rank 0 compares the free space of the checkpoint folder with the size of the newest
complete save there (:func:`space_problem`); every rank learns the verdict with the collective that
starts the save, so a full disk stops every rank at the same point with one message
(:class:`CheckpointSaveError` with ``everywhere``), the earlier saves untouched. A save that fails
anyway (a quota, an I/O error) raises it on the rank that failed, with the failure's own cause
(:func:`failure_text`) and the free space. No communication here.
"""

from __future__ import annotations

import os
import shutil

__all__ = [
    "CheckpointSaveError",
    "failure_text",
    "folder_bytes",
    "space_problem",
    "write_failed",
]

#: Room asked for beyond the newest save's size (saves of one run differ by a few metadata bytes).
SLACK = 1 << 20
#: Free bytes below which a failed save's filesystem is called full.
FULL_BELOW = 64 << 20


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written. ``everywhere``: raised on every rank at the same point
    (the space check), so one rank's message is enough; otherwise only where the write failed."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def failure_text(err: BaseException) -> str:
    """One line for a save or load failure: torch's CheckpointException carries each rank's own
    exception (its text is a multi-line traceback); the first line of anything else, with an
    OS error found among its causes (``No space left on device``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = sorted(failures.items(), key=lambda kv: kv[0])[0][1]
        inner = inner[0] if isinstance(inner, tuple) and inner else inner  # (exception, trace)
        err = inner if isinstance(inner, BaseException) else err
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0][:160] if lines else ""
    detail = next((line for line in lines[1:] if "rror" in line), None)  # a nested cause
    if detail is not None:
        text += f" ... {detail[:200]}"
    cause, seen = err.__cause__ or err.__context__, 0
    while cause is not None and seen < 8:  # torch wraps the OSError of a failed write
        if isinstance(cause, OSError) and cause.strerror and cause.strerror not in text:
            text += f" ({cause.strerror})"
            break
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return f"{type(err).__name__}: {text}"


def folder_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (0 when it is gone)."""
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(top, name))
            except OSError:
                pass
    return total


def gib(n: int) -> str:
    """Bytes for a message: GiB, MiB, or bytes."""
    if n >= 2**26:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def leftover_bytes(root: str) -> int:
    """Bytes of the ``.tmp-iter_*`` / ``.old-iter_*`` folders of interrupted saves in ``root``
    (removed before a save writes: room it will have)."""
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    return sum(folder_bytes(os.path.join(root, n)) for n in names
               if n.startswith((".tmp-iter_", ".old-iter_")))  # fmt: skip


#: What a training run's saves tell the user to change (preparations and eaopd-convert pass
#: their own): where the room is made, and how the work continues.
TRAINING_FIX = (
    "move the checkpoint folder to another disk and set training.checkpoint_dir to its new "
    "place (an empty new folder would start the run again: refused), then run the same command "
    "again to resume"
)


def space_problem(
    root: str, name: str, done: list[str], latest: str | None, fix: str | None = None
) -> str | None:
    """Rank 0, before saving ``name`` under ``root``: the refusal when the filesystem has less
    room than the newest complete save takes (None when it has, or nothing was saved there yet:
    the first save's size is unknown). ``done``: the complete saves there, oldest first;
    ``latest``: the one ``latest`` names; ``fix``: the end of the advice (TRAINING_FIX)."""
    if not done:
        return None
    newest = done[-1]
    need = folder_bytes(os.path.join(root, newest)) + SLACK
    free = free_bytes(root)
    if free is None:
        return None
    free += leftover_bytes(root)  # an interrupted save's folder is removed before writing
    if free >= need:
        return None
    older = [n for n in done if n != (latest or newest)]
    room = "free space on that disk"
    if older and fix is None:
        room = (f"delete older iter_* folders there ({len(older)}; training.keep_checkpoints "
                "keeps fewer from then on)")  # fmt: skip
    return (
        f"cannot save {name}: {root} has {gib(free)} free and a save needs {gib(need)} "
        f"({newest}'s size + 1 MiB), so it would fail part-way. Nothing was written; "
        f"{latest or newest} (latest) is intact. Make room ({room}) or {fix or TRAINING_FIX}"
    )


def write_failed(
    root: str, name: str, rank: int, err: BaseException, latest: str | None, free: int | None,
    fix: str | None = None,
) -> str:  # fmt: skip
    """The message for a save of ``name`` that failed on ``rank``; ``free``: the filesystem's
    free bytes when it failed (before the unfinished save was removed). torch's writers often
    lose the OSError (``unexpected pos 704 vs 598``), so a filesystem with (almost) nothing
    left is named as full. ``fix``: as for :func:`space_problem`."""
    room = ""
    if free is not None:
        full = free < FULL_BELOW
        room = f"; {'the disk is full: ' if full else ''}{gib(free)} free there when it failed"
    kept = f"{latest} (latest) is intact" if latest else "No earlier save there"
    return (
        f"saving {name} to {root} failed on rank {rank}: {failure_text(err)}{room}. {kept}; "
        "an unfinished save is removed. Fix the cause (a full disk or quota: free space there) "
        f"or {fix or TRAINING_FIX}"
    )
