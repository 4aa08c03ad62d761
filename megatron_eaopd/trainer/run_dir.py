"""The run folder ``training.output_dir``: one live run at a time, and no attempt's records lost.

- :func:`lock_output_dir`: the process that writes the folder (rank 0: config.yaml, metrics.jsonl,
  eval_samples/) holds an exclusive ``fcntl.flock`` on ``<output_dir>/run.lock`` from before it
  writes anything there to the end of the run. A second launch into the folder is refused
  (:class:`RunFolderBusy`, a ValueError: ``eaopd-train`` exits 2) naming the holder. The kernel
  releases the lock when its process ends, however it ends (SIGKILL, a job killed or requeued by
  Slurm): a killed run is resumed without cleanup. The file's text (host, pid, start time) is the
  last holder's note, never what decides; deleting the file of a live run defeats the lock.
  :func:`lock_run_folders` also locks a ``training.checkpoint_dir`` outside the run folder.
- :func:`set_aside_earlier_attempt`: a fresh start in a folder whose earlier attempt left records
  and no checkpoint (``trainer.checks.check_output_dir`` refuses it when its run settings differ)
  moves that attempt's metrics.jsonl, eval_samples/ and tensorboard/ (and a copy of its
  config.yaml) into ``<output_dir>/earlier_attempts/<UTC time>-no-checkpoint/``.
- :func:`set_aside_after`: a resume from the checkpoint of iteration N moves the records the
  interrupted attempt wrote after it (metrics.jsonl lines and eval_samples files of iterations
  above N, which the resumed run writes again) into ``earlier_attempts/<UTC time>-after-iter_N/``.
- :func:`check_moved_checkpoints`, :func:`check_foreign_checkpoints`: a run folder whose
  checkpoints are elsewhere than ``training.checkpoint_dir`` says, or a checkpoint folder of
  another live run, is refused (ValueError); so are complete saves without a ``latest`` marker
  (:func:`check_unmarked_checkpoints`) and a latest save that cannot load
  (:func:`latest_checkpoint_problem`), naming the earlier one to fall back on. Where the run
  folder's config.yaml is gone, its settings come from the checkpoint (:func:`saved_run_config`).
- :func:`length_problem`: a resume shorter than the iterations its checkpoint has done, or longer
  than its decaying learning-rate schedule planned, is refused (the message gives the fix).

Files only, on one process (rank 0); no communication.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time

logger = logging.getLogger(__name__)

__all__ = [
    "ASIDE",
    "LOCK_NAME",
    "RunFolderBusy",
    "RunRefused",
    "broken_checkpoint_message",
    "check_foreign_checkpoints",
    "check_moved_checkpoints",
    "check_unmarked_checkpoints",
    "evaluated_marker",
    "latest_checkpoint_problem",
    "length_problem",
    "load_for_resume",
    "lock_output_dir",
    "lock_run_folders",
    "mark_evaluated",
    "planned_iterations",
    "saved_by",
    "saved_run_config",
    "set_aside_after",
    "set_aside_earlier_attempt",
    "try_flock",
    "within",
]

LOCK_NAME = "run.lock"
ASIDE = "earlier_attempts"
_SAMPLES = re.compile(r"^\w+_iter_(\d+)\.jsonl$")  # trainer.evaluate.write_samples


class RunRefused(ValueError):
    """The run folder's state refuses this launch (``eaopd-train`` prints the message and exits
    2, as for a configuration error): every rank raises it at the same point of the setup."""


class RunFolderBusy(RunRefused):
    """Another live process holds the run folder's lock."""


def try_flock(handle) -> bool:
    """Take an exclusive ``fcntl.flock`` on the open file ``handle`` without waiting: True when
    taken, False when another open file (another process) holds it. OSError where the filesystem
    has no locks (some network filesystems; Lustre without ``-o flock``)."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _Held:
    """One process's hold on a run folder's lock (re-entrant: counted)."""

    def __init__(self, handle):
        self.handle, self.count = handle, 0


_HELD: dict[str, _Held] = {}


class RunFolderLock:
    """A hold on ``<output_dir>/run.lock`` (from :func:`lock_output_dir`); :meth:`release` once
    per :func:`lock_output_dir` call (the last one unlocks; exiting the process does too)."""

    def __init__(self, key: str):
        self.key, self.released = key, False

    def release(self) -> None:
        held = _HELD.get(self.key)
        if self.released or held is None:
            return
        self.released = True
        held.count -= 1
        if held.count == 0:
            del _HELD[self.key]
            if held.handle is not None:
                held.handle.close()  # closing the last descriptor drops the flock

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            note = f.read().strip()
    except OSError:
        note = ""
    return note or "a process that recorded no host or pid"


def lock_run_folders(cfg) -> list[RunFolderLock]:
    """Hold the run folder's lock (:func:`lock_output_dir`) and, when ``training.checkpoint_dir``
    lies outside it, that folder's too: two runs sharing one checkpoint folder would overwrite
    each other's saves. Raises :class:`RunFolderBusy` (nothing held then). No communication."""
    t = cfg.training
    held = [lock_output_dir(t.output_dir)]
    if t.checkpoint_dir and not within(t.checkpoint_dir, t.output_dir):
        try:
            held.append(lock_output_dir(t.checkpoint_dir, "training.checkpoint_dir"))
        except BaseException:
            held[0].release()
            raise
    return held


def lock_output_dir(output_dir: str, setting: str = "training.output_dir") -> RunFolderLock:
    """Hold the lock of the run folder ``output_dir`` (made if missing; ``setting``: the key that
    names it, for messages) for this process, or raise :class:`RunFolderBusy` naming the folder,
    the holder and the fix. Re-entrant in one process (the CLI takes it before the data is
    prepared, ``Trainer.setup`` again). Where the filesystem has no locks: a warning, and the run
    goes on unlocked. No communication."""
    path = os.path.join(output_dir, LOCK_NAME)
    key = os.path.realpath(output_dir)
    held = _HELD.get(key)
    if held is None:
        try:
            os.makedirs(output_dir, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
        except OSError as err:
            raise ValueError(
                f"{setting}={output_dir}: cannot create {path} "
                f"({type(err).__name__}: {err.strerror or err}); give a writable folder"
            ) from None
        try:
            got = try_flock(handle)
        except OSError as err:
            logger.warning("no file lock on %s (%s): nothing stops a second launch into %s",
                           path, err, output_dir)  # fmt: skip
            handle.close()
            handle, got = None, True
        if not got:
            handle.close()
            raise RunFolderBusy(
                f"{setting}={output_dir} is in use by another live run "
                f"({_holder(path)}; it holds {path}). Two launches into one folder would mix "
                "their metrics, config.yaml and checkpoints. Wait for that run to end (or stop "
                f"it), or give this one a new {setting}"
            )
        if handle is not None:
            try:
                handle.seek(0)
                handle.truncate()
                stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                line = f"host {socket.gethostname()} pid {os.getpid()} since {stamp}\n"
                os.write(handle.fileno(), line.encode())  # unbuffered: close() cannot fail again
            except OSError as err:  # a full disk: the run could write nothing there either
                handle.close()
                raise ValueError(
                    f"{setting}={output_dir}: cannot write {path} ({err.strerror or err}); free "
                    "space on that disk or give another folder"
                ) from None
        held = _HELD[key] = _Held(handle)
    held.count += 1
    return RunFolderLock(key)


def _aside_folder(output_dir: str, why: str) -> str:
    """A new ``<output_dir>/earlier_attempts/<UTC time>-<why>`` folder (numbered if taken)."""
    base = os.path.join(output_dir, ASIDE, time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + why)
    folder, n = base, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    os.makedirs(folder)
    return folder


def set_aside_earlier_attempt(output_dir: str) -> str | None:
    """Before a fresh start: move an earlier attempt's records (metrics.jsonl, eval_samples/,
    tensorboard/; a copy of its config.yaml beside them) out of ``output_dir`` into a new
    ``earlier_attempts/<time>-no-checkpoint`` folder, which is returned (None: nothing there).
    Call under the folder's lock, before this run writes its config.yaml."""
    names = [n for n in ("metrics.jsonl", "eval_samples", "tensorboard")
             if os.path.exists(os.path.join(output_dir, n))]  # fmt: skip
    if not names:
        return None
    folder = _aside_folder(output_dir, "-no-checkpoint")
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(folder, name))
    config = os.path.join(output_dir, "config.yaml")
    if os.path.isfile(config):
        shutil.copy2(config, os.path.join(folder, "config.yaml"))
    logger.warning(
        "%s holds records of an earlier attempt that saved no checkpoint (%s): starting afresh, "
        "they were moved to %s", output_dir, ", ".join(names), folder,
    )  # fmt: skip
    return folder


def set_aside_after(output_dir: str, iteration: int) -> str | None:
    """Before a resume from the checkpoint of ``iteration``: move the metrics.jsonl records and
    eval_samples files of later iterations (the interrupted attempt's, redone by this run) into
    a new ``earlier_attempts/<time>-after-iter_<iteration>`` folder, returned (None: none),
    with any line that is not a JSON record (the last one of a killed run, cut short).
    metrics.jsonl keeps its other lines in order. Call under the folder's lock."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    keep, later = [], []
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    past = int(json.loads(line).get("iteration", 0)) > iteration
                except (ValueError, TypeError, AttributeError):
                    past = True  # a line a crash cut short: the interrupted attempt's too
                (later if past else keep).append(line if line.endswith("\n") else line + "\n")
    samples = os.path.join(output_dir, "eval_samples")
    files = []
    if os.path.isdir(samples):
        for name in sorted(os.listdir(samples)):
            match = _SAMPLES.match(name)
            if match and int(match.group(1)) > iteration:
                files.append(name)
    if not later and not files:
        return None
    folder = _aside_folder(output_dir, f"-after-iter_{iteration:07d}")
    if later:
        with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(later)
        tmp = metrics + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, metrics)
    if files:
        os.makedirs(os.path.join(folder, "eval_samples"))
        for name in files:
            os.replace(os.path.join(samples, name), os.path.join(folder, "eval_samples", name))
    logger.warning(
        "resuming from iteration %d: the interrupted attempt's records of later iterations "
        "(%d metrics.jsonl lines, %d eval_samples files) were moved to %s", iteration,
        len(later), len(files), folder,
    )  # fmt: skip
    return folder


def length_problem(cfg, data) -> str | None:
    """A resume whose training length (``training.iterations``, else the epochs over ``data``'s
    distillation prompts) is below the iteration its checkpoint saved (nothing would train, and
    config.yaml would claim the shorter run), or, under a decaying learning-rate schedule, above
    the length the schedule was planned for (:func:`planned_iterations`: megatron's restored
    scheduler continues as saved, so every iteration past it would run at
    ``optimizer.min_lr``, 0 by default: compute spent, weights unchanged); else None. A shorter
    length than planned is allowed (the schedule stops early). Reads the checkpoint's meta."""
    from megatron_eaopd.data.sampling import run_iterations
    from megatron_eaopd.models.checkpoint import read_meta, resolve_checkpoint
    from megatron_eaopd.trainer.checks import checkpoint_dir, will_resume

    if not will_resume(cfg):
        return None
    try:
        path = resolve_checkpoint(checkpoint_dir(cfg))
        meta = read_meta(path)
    except (OSError, ValueError):
        return None  # the resume itself reports a missing or broken checkpoint
    total, t, o = run_iterations(cfg, len(data.distill)), cfg.training, cfg.optimizer
    done, name = int(meta.get("iteration", 0)), os.path.basename(path)
    planned = planned_iterations(meta.get("extra", {}))
    if planned is not None and total > planned and o.lr_schedule != "constant":
        return (
            f"training.output_dir={t.output_dir} holds a run planned for {planned} "
            f"iterations; this config asks for {total}. Its learning-rate schedule "
            f"(optimizer.lr_schedule={o.lr_schedule}) continues as saved in the checkpoint, so "
            f"iterations {planned + 1}..{total} would run at optimizer.min_lr={o.min_lr}. Set "
            f"training.iterations to {planned} or less, or start a longer run in a new "
            "training.output_dir"
        )
    if done <= total:
        return None
    how = f"training.iterations={t.iterations}" if t.iterations else (
        f"training.epochs={t.epochs} of the distillation prompts")  # fmt: skip
    return (
        f"training.output_dir={t.output_dir} holds a run saved at iteration {done} ({name}), "
        f"beyond this run's length of {total} iteration{'s' * (total != 1)} ({how}): resuming "
        "would train nothing and record the shorter run. Set training.iterations to "
        f"{done} or more to continue it, or use a new training.output_dir"
    )


def planned_iterations(extra: dict, default: int | None = None) -> int | None:
    """The run length a checkpoint's learning-rate schedule was built for, from its ``extra``:
    ``planned_iterations`` (the first attempt's length, carried by every later save; megatron's
    restored scheduler keeps that decay horizon), else ``total_iterations`` (checkpoints from
    before it was recorded: the saving attempt's length), else ``default``."""
    for key in ("planned_iterations", "total_iterations"):
        if isinstance(extra.get(key), int):
            return extra[key]
    return default


def check_moved_checkpoints(t, ckpt_dir: str) -> None:
    """``training.checkpoint_dir`` changed away from the checkpoints of the run in
    ``training.output_dir`` (its config.yaml's checkpoint folder, or the default one, holds a
    ``latest``): starting afresh would rewrite that run's metrics. ValueError naming both."""
    import yaml

    from megatron_eaopd.models.checkpoint import LATEST

    saved_dir = None
    try:
        with open(os.path.join(t.output_dir, "config.yaml"), encoding="utf-8") as f:
            saved_dir = (yaml.safe_load(f) or {}).get("training", {}).get("checkpoint_dir")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    for folder in (saved_dir, os.path.join(t.output_dir, "checkpoints")):
        if (
            isinstance(folder, str)
            and os.path.realpath(folder) != os.path.realpath(ckpt_dir)
            and os.path.isfile(os.path.join(folder, LATEST))
        ):
            raise ValueError(
                f"training.output_dir={t.output_dir} holds a run whose checkpoints are in "
                f"{folder}, but training.checkpoint_dir={t.checkpoint_dir!r} points elsewhere: "
                f"the run would start again and rewrite its metrics. Set "
                f"training.checkpoint_dir={folder} to resume it, or use a new training.output_dir"
            )


def within(path: str, folder: str) -> bool:
    """Whether ``path`` lies strictly inside ``folder`` (both resolved: links, ``..``)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_foreign_checkpoints(cfg, ckpt_dir: str, name: str) -> None:
    """Two live runs sharing one ``training.checkpoint_dir``: refused when it is set outside
    ``training.output_dir`` and its checkpoints record another run folder (saved by
    ``Trainer.save``) that still holds its config.yaml; resuming would continue that run here.
    A moved run (its old folder gone), checkpoints copied into a run folder (the default
    checkpoint_dir) and saves that record no folder (older versions, imports) are accepted."""
    t = cfg.training
    here = os.path.realpath(t.output_dir)
    if not t.checkpoint_dir or within(t.checkpoint_dir, here):
        return
    owner = saved_by(os.path.join(ckpt_dir, name))  # None: unreadable (the resume reports it)
    if not owner or os.path.realpath(owner) == here:
        return
    if os.path.isfile(os.path.join(owner, "config.yaml")):
        raise ValueError(
            f"training.checkpoint_dir={t.checkpoint_dir} holds checkpoints of the run in {owner} "
            f"({name}), not of training.output_dir={t.output_dir}: resuming would continue "
            "that run here. Give this run its own training.checkpoint_dir, set "
            "training.output_dir to that run's folder to continue it, or start from its weights "
            "with model.student_checkpoint"
        )


def check_unmarked_checkpoints(ckpt_dir: str, output_dir: str, resume: bool = True) -> None:
    """Complete saves (``iter_*`` with their metadata) in a checkpoint folder without a ``latest``
    marker. When the newest was saved by this run folder (a kill between a save's rename and its
    marker, or a marker deleted by hand) and ``resume`` (training.resume) is on, rank 0 marks it
    (the others read the marker only after the process group's rendezvous with rank 0) and the
    run resumes from it. Otherwise (saves copied in by hand, or a fresh start asked for) a fresh
    start would overwrite them: ValueError naming the newest one and the two ways on."""
    from megatron_eaopd.models.checkpoint import LATEST, _write_atomic, complete_checkpoints

    complete = complete_checkpoints(ckpt_dir)
    if complete:
        latest = os.path.join(ckpt_dir, LATEST)
        saver = saved_by(os.path.join(ckpt_dir, complete[-1]))
        own = saver is not None and os.path.realpath(saver) == os.path.realpath(output_dir)
        if own and resume:
            if int(os.environ.get("RANK", "0")) == 0:
                logger.warning("%s: %s is complete but was not marked as the latest save (the "
                               "run stopped in between): marked it", ckpt_dir,
                               complete[-1])  # fmt: skip
                _write_atomic(latest, complete[-1] + "\n")
            return
        raise ValueError(
            f"{ckpt_dir} holds complete checkpoints ({', '.join(complete)}) but no {LATEST!r} "
            f"marker, so the run would start afresh and overwrite them. To resume the newest: "
            f"echo {complete[-1]} > {latest}; to start over, move them away or set a new "
            "training.checkpoint_dir"
        )


def saved_by(path: str) -> str | None:
    """The run folder the checkpoint folder ``path`` records (``Trainer.save``), else None."""
    from megatron_eaopd.models.checkpoint import read_meta

    try:
        owner = read_meta(path).get("extra", {}).get("output_dir")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, str) else None


def latest_checkpoint_problem(ckpt_dir: str, name: str) -> str | None:
    """Why the checkpoint ``latest`` names cannot be resumed from, found from its files before
    any model is built (its metadata or dist_checkpointing's missing or unreadable), with the
    earlier complete checkpoints to fall back on; None when it looks whole. Shard contents are
    only read by the load itself (``Trainer._resume`` names the same fix)."""
    from megatron.core import dist_checkpointing

    from megatron_eaopd.models.checkpoint import read_meta

    path = os.path.join(ckpt_dir, name)
    why = None
    try:
        read_meta(path)
    except FileNotFoundError:
        why = "missing, or without its eaopd_meta.json"
    except (OSError, ValueError) as err:  # a cut-short or corrupted eaopd_meta.json
        why = f"unreadable eaopd_meta.json ({type(err).__name__}: {err})"
    if why is None:
        try:
            whole = dist_checkpointing.check_is_distributed_checkpoint(path)
        except (OSError, ValueError, TypeError):
            whole = False
        if not whole:
            why = "no readable metadata.json of dist_checkpointing"
    if why is None:
        why = _shard_problem(path)
    return None if why is None else broken_checkpoint_message(ckpt_dir, name, why)


def _shard_problem(path: str) -> str | None:
    """A shard file that torch.distributed.checkpoint's ``.metadata`` lists but that is missing
    or shorter than the bytes it records there (a copy or a save cut short), or a missing
    ``common.pt``; None when all are there, or when the metadata is not of the layout this
    reads (the load then decides). File sizes only: no tensor is read."""
    if not os.path.isfile(os.path.join(path, "common.pt")):
        return "no common.pt"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(path).read_metadata().storage_data
        need: dict[str, int] = {}
        for info in storage.values():
            end = int(info.offset) + int(info.length)
            need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    except Exception:  # noqa: BLE001 - another format or version: leave it to the load
        return None
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"its shard {rel} is missing"
        if os.path.getsize(file) < size:
            return f"its shard {rel} is cut short ({os.path.getsize(file)} of {size} bytes)"
    return None


def broken_checkpoint_message(ckpt_dir: str, name: str, why: str) -> str:
    """A checkpoint that ``latest`` names and that cannot be loaded: what to do."""
    from megatron_eaopd.models.checkpoint import LATEST, complete_checkpoints

    earlier = [n for n in complete_checkpoints(ckpt_dir) if n < name]
    latest = os.path.join(ckpt_dir, LATEST)
    back = (f"to resume from the newest earlier one, echo {earlier[-1]} > {latest} (its later "
            "records are moved aside, and the broken save is overwritten when the run gets "
            "there); " if earlier else "there is no earlier complete checkpoint; ")  # fmt: skip
    return (
        f"the latest checkpoint {os.path.join(ckpt_dir, name)} cannot be resumed from ({why}): "
        f"{back}to start over, move {ckpt_dir} away or set a new training.checkpoint_dir"
    )


def saved_run_config(ckpt_dir: str) -> dict | None:
    """The run config (``config_to_dict``) the checkpoint ``latest`` names recorded
    (``Trainer.save``), for comparing settings when the run folder's config.yaml is gone; None
    without one (no checkpoint, an older version's, unreadable)."""
    from megatron_eaopd.models.checkpoint import read_meta, resolve_checkpoint

    try:
        config = read_meta(resolve_checkpoint(ckpt_dir)).get("extra", {}).get("config")
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_for_resume(ckpt_dir: str, student):
    """``models.checkpoint.load_checkpoint`` of the latest save into ``student`` (its chunks,
    optimizer and scheduler); a save that fails to load (a cut-short or missing shard) raises
    :class:`RunRefused` naming it and the earlier save to fall back on. A ValueError (another
    model shape, no optimizer state) keeps its own message. Collectives: those of the load."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_eaopd.models.checkpoint import load_checkpoint, read_latest
    from megatron_eaopd.models.save_errors import failure_text

    try:
        return load_checkpoint(ckpt_dir, student.chunks, student.optimizer, student.scheduler)
    except ValueError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - whatever the reader raised
        name = read_latest(ckpt_dir)
        raise RunRefused(broken_checkpoint_message(ckpt_dir, name, failure_text(err))) from err


def evaluated_marker(ckpt_dir: str, iteration: int) -> bool:
    """Whether the checkpoint of ``iteration`` is marked evaluated (:func:`mark_evaluated`)."""
    from megatron_eaopd.models.checkpoint import checkpoint_name

    return os.path.isfile(os.path.join(ckpt_dir, checkpoint_name(iteration), "evaluated"))


def mark_evaluated(ckpt_dir: str, iteration: int) -> None:
    """Mark the checkpoint of ``iteration`` evaluated (its evaluation ran after the save), so a
    resumed run does not repeat it; a write that fails (a full disk) is a warning: a relaunch
    then evaluates again. Rank 0; no communication."""
    from megatron_eaopd.models.checkpoint import checkpoint_name

    folder = os.path.join(ckpt_dir, checkpoint_name(iteration))
    try:
        if os.path.isdir(folder):
            with open(os.path.join(folder, "evaluated"), "w", encoding="utf-8") as f:
                f.write("1\n")
    except OSError as err:
        logger.warning("cannot mark %s evaluated (%s): a relaunch evaluates it again", folder,
                       err)  # fmt: skip
