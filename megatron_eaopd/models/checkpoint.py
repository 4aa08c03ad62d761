"""Student and teacher checkpoints with megatron-core dist_checkpointing, written atomically.

Layout of a checkpoint root (a shared filesystem every rank sees):

    root/latest                  one line: the name of the newest complete checkpoint
    root/iter_0000100/           a complete checkpoint (dist_checkpointing files + eaopd_meta.json)
    root/.tmp-iter_0000200/      a save in progress or interrupted: never read

A save writes everything into the temp directory, then rank 0 writes eaopd_meta.json, renames the
directory to iter_NNNNNNN and finally replaces `latest` (write + fsync + os.replace). A crash at any
point leaves `latest` naming the previous complete checkpoint.

dist_checkpointing stores every tensor under its global key and offset, so a checkpoint saved at
one TP/PP (x VPP) layout loads at another (resharding). The optimizer state follows the
parameters. RNG states are per rank and only restored at the layout they were saved at.

eaopd_meta.json also records the model's shape (`model_config`, a ModelConfig dict: the one
build_model recorded on the chunks, or the one passed) and where the weights came from
(`source`, e.g. "hf:/models/Qwen3-8B"). Loading into a model built from another shape is refused
with the differing fields named; checkpoints without a recorded config load as before.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatron_eaopd.models.save_errors import (
    CheckpointSaveError,
    failure_text,
    free_bytes,
    space_problem,
    write_failed,
)

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "eaopd_meta.json"
FORMAT_VERSION = 1
# Test hook: called on every rank after the sharded save, before the checkpoint is committed.
_before_commit = None


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` restored.

    Attributes:
        path: directory of the loaded checkpoint.
        iteration: training iteration saved with it.
        extra: the `extra` dict given to save_checkpoint (e.g. the data position).
        saved_layout: {"tp", "pp", "vpp", "world_size"} at save time.
        rng_restored: False when the layout changed (RNG states are per rank).
    """

    path: str
    iteration: int
    extra: dict = field(default_factory=dict)
    saved_layout: dict = field(default_factory=dict)
    rng_restored: bool = False


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` (>= 1) complete ``iter_*`` folders of ``root`` up to
    the one ``latest`` names (never that one; newer ones are an abandoned attempt's, left for the
    run to replace when it gets there) and leftovers of interrupted saves (``.tmp-iter_*`` /
    ``.old-iter_*``); returns the deleted paths. Call on one rank after a save. No communication.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not os.path.isdir(root):
        return []
    latest, names = read_latest(root), complete_checkpoints(root)
    if latest in names:  # saves newer than latest belong to an abandoned attempt (a resume
        names = names[: names.index(latest) + 1]  # from an earlier save): not counted, kept
    doomed = [n for n in names[:-keep] if n != latest]
    for n in doomed:  # renamed first: a kill mid-delete leaves an .old- folder, which the
        gone = os.path.join(root, f".old-{n}")  # next save removes
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(os.path.join(root, n), gone)
        shutil.rmtree(gone, ignore_errors=True)
    doomed += _remove_leftovers(root)
    return [os.path.join(root, n) for n in doomed]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def _modules(chunks) -> list:
    """Bare modules of `chunks` (a list, one module, or a FrozenTeacher; DDP unwrapped)."""
    chunks = getattr(chunks, "chunks", chunks)
    if not isinstance(chunks, (list, tuple)):
        chunks = [chunks]
    return [getattr(c, "module", c) for c in chunks]


def _model_sharded_state_dict(modules) -> dict:
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def _capture_rng() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", data, (world,), (_rank(),), replica_id=0)


def save_checkpoint(
    root: str,
    iteration: int,
    chunks,
    optimizer=None,
    scheduler=None,
    extra: dict | None = None,
    save_rng: bool = True,
    *,
    model_config=None,
    source: str | None = None,
    fix: str | None = None,
) -> str:
    """Save model (+ optimizer, scheduler, RNG, iteration, extra) to root/iter_NNNNNNN; return it.

    Every rank must call it. `chunks`: the model chunks (bare or DDP-wrapped); `extra`: a
    JSON-serialisable dict of anything else to resume (data position, counters), taken from rank 0.
    `model_config`: the ModelConfig to record (default: the one build_model put on the chunks);
    `source`: where the weights come from (default: the chunks' record, e.g. "hf:DIR" after
    load_hf_weights, or the checkpoint they were loaded from). ``fix``: what a
    :class:`CheckpointSaveError` tells the user to do besides freeing space (default: a training
    run's, ``save_errors.TRAINING_FIX``).
    Collectives: barriers and dist_checkpointing's save (metadata gather, per-rank writes).
    """
    from megatron_eaopd.parallel.init import rank0_object

    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    extra = dict(extra or {})
    json.dumps(extra)  # fail before writing anything if extra is not serialisable
    modules = _modules(chunks)
    model_config = model_config or getattr(modules[0], "eaopd_model_config", None)
    source = source or getattr(modules[0], "eaopd_source", None)
    name = checkpoint_name(iteration)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")
    latest = problem = None
    if _rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            _remove_leftovers(root)  # of interrupted saves: garbage that only takes room
            latest = read_latest(root)
            done = complete_checkpoints(root)
            problem = space_problem(root, name, done, latest, fix)
            if problem is None:
                os.makedirs(tmp)
        except OSError as err:  # told to every rank below, not raised here alone
            problem = f"cannot save {name} to {root}: {failure_text(err)}"
    problem = rank0_object(problem)  # in place of a barrier: every rank stops here, or none
    if problem is not None:
        raise CheckpointSaveError(problem, everywhere=True)
    try:
        _write(modules, optimizer, scheduler, save_rng, iteration, tmp)
        if _rank() == 0:
            meta = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "layout": _layout(),
                "has_optimizer": optimizer is not None,
                "has_scheduler": scheduler is not None,
                "has_rng": save_rng,
                "extra": extra,
                "model_config": None if model_config is None else model_config.to_dict(),
                "source": source,
            }
            _commit(root, name, tmp, final, json.dumps(meta, indent=2, sort_keys=True))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        free = free_bytes(root)  # before the unfinished save is removed
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(
            write_failed(root, name, _rank(), err, latest or read_latest(root), free, fix)
        ) from err
    _barrier()
    return final


def read_latest(root: str) -> str | None:
    """The name ``root/latest`` holds (None: no marker, or an empty one)."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write(modules, optimizer, scheduler, save_rng: bool, iteration: int, tmp: str) -> None:
    """Every rank: the sharded save of model, optimizer, scheduler, RNG and iteration to tmp."""
    from megatron.core import dist_checkpointing

    from megatron_eaopd.signals import install_orphan_guard, preemption_signals_blocked

    sharded = _model_sharded_state_dict(modules)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded)
    if scheduler is not None:
        sharded["scheduler"] = scheduler.state_dict()
    if save_rng:
        sharded["rng_state"] = _rng_sharded_object(_capture_rng())
    sharded["iteration"] = iteration
    # Helper processes the save starts must not die of a pre-timeout signal (signals.py).
    with preemption_signals_blocked():
        install_orphan_guard()  # and they die with this process, even on SIGKILL
        dist_checkpointing.save(sharded, tmp)
    _barrier()
    if _before_commit is not None:
        _before_commit(tmp)


def _commit(root: str, name: str, tmp: str, final: str, meta_text: str) -> None:
    """Rank 0: eaopd_meta.json into tmp, tmp renamed to final, then ``latest`` replaced."""
    _write_atomic(os.path.join(tmp, META), meta_text)
    if os.path.exists(final):  # re-saving an iteration: keep the old one until the rename
        old = os.path.join(root, f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(os.path.join(root, LATEST), name + "\n")
    logger.info("saved checkpoint %s", final)
    _remove_leftovers(root)


def _remove_leftovers(root: str) -> list[str]:
    """Delete ``.tmp-iter_*`` / ``.old-iter_*`` folders of interrupted saves and prunes (a save
    killed by a preemption's end at an iteration never saved again left a full-size one for
    good); returns their names. Rank 0 of the run that owns ``root``, after a complete save."""
    gone = [n for n in os.listdir(root) if n.startswith((".tmp-iter_", ".old-iter_"))]
    for n in gone:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return gone


def complete_checkpoints(root: str) -> list[str]:
    """The ``iter_*`` folders of ``root`` that hold their metadata (complete saves), oldest
    first; [] for a missing folder."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(
        n for n in names if n.startswith("iter_") and os.path.isfile(os.path.join(root, n, META))
    )


def resolve_checkpoint(root: str, iteration: int | None = None) -> str:
    """Directory of the checkpoint to load: `iteration`, or the one `latest` names.

    Raises FileNotFoundError naming the fix when there is none or it is incomplete.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"no checkpoint directory {root!r}: check the checkpoint path, or start from scratch "
            f"(do not ask to load/resume)."
        )
    if iteration is None:
        latest = os.path.join(root, LATEST)
        if not os.path.isfile(latest):
            inner = os.path.join(root, "checkpoints")
            hint = (
                f"{root!r} looks like a run folder: its checkpoints are in {inner!r}"
                if os.path.isfile(os.path.join(inner, LATEST))
                else "Pass the directory of a saved run's checkpoints, or an explicit iteration, "
                "or start from scratch"
            )
            raise FileNotFoundError(
                f"{root!r} has no '{LATEST}' marker, so it holds no complete checkpoint (a save "
                f"may have been interrupted). {hint}."
            )
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
    else:
        name = checkpoint_name(iteration)
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, META)):
        complete = complete_checkpoints(root)
        raise FileNotFoundError(
            f"checkpoint {path!r} is missing or incomplete (no {META}). Complete ones: "
            f"{complete or 'none'}"
            + (
                f"; write one's name into {os.path.join(root, LATEST)} to use it (or pass its "
                "iteration when loading)"
                if complete
                else ""
            )  # fmt: skip
        )
    return path


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META), encoding="utf-8") as f:
        return json.load(f)


def read_model_config(root: str, iteration: int | None = None):
    """(ModelConfig or None, source or None) recorded with a checkpoint (no communication).

    `root`: a checkpoint root (its `latest` or `iteration` is read) or a checkpoint directory.
    None for checkpoints saved before configs were recorded.
    """
    from megatron_eaopd.models.config import ModelConfig

    if iteration is None and os.path.isfile(os.path.join(root, META)):
        path = root
    else:
        path = resolve_checkpoint(root, iteration)
    meta = read_meta(path)
    data = meta.get("model_config")
    return (None if data is None else ModelConfig.from_dict(data)), meta.get("source")


def check_model_config(meta: dict, modules, path: str) -> None:
    """ValueError naming the differing fields when the checkpoint's recorded shape differs from
    the one the modules were built from (skipped when either is unknown)."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.config import ModelConfig

    data = meta.get("model_config")
    built = getattr(modules[0], "eaopd_model_config", None)
    if data is None or built is None:
        return
    saved = ModelConfig.from_dict(data)
    diffs = saved.differences(built, ps.get_tensor_model_parallel_world_size())
    if diffs:
        raise ValueError(
            f"checkpoint {path!r} holds another model than the one built (checkpoint != model): "
            f"{'; '.join(diffs)}. Build the model from the checkpoint's config "
            f"(models.checkpoint.read_model_config) or load the right checkpoint."
        )


def load_checkpoint(
    root: str,
    chunks,
    optimizer=None,
    scheduler=None,
    iteration: int | None = None,
    load_rng: bool = True,
    strict: bool = True,
    *,
    check_config: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint saved by save_checkpoint into `chunks` (+ optimizer, scheduler, RNG).

    `root`: a checkpoint root (the one `latest` names, or `iteration`), or one checkpoint folder
    itself (it holds the metadata file; `iteration` must then be None).

    Works at any TP/PP (x VPP) layout that fits the model. RNG states are restored only when the
    layout (tp, pp, vpp, world size) equals the saved one. Raises FileNotFoundError for a missing
    checkpoint and ValueError when an optimizer is requested but was not saved, or (with
    `check_config`) when the checkpoint records another model shape than the chunks were built
    from. Collectives: dist_checkpointing's load (metadata exchange, reads).
    """
    from megatron.core import dist_checkpointing

    if iteration is None and os.path.isfile(os.path.join(root, META)):
        path = root  # one checkpoint folder (iter_N or a copy), not a root
    else:
        path = resolve_checkpoint(root, iteration)
    meta = read_meta(path)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise ValueError(
            f"checkpoint {path!r} has no optimizer state (saved model-only, e.g. a teacher): load "
            f"it without an optimizer, or resume from a student checkpoint."
        )
    modules = _modules(chunks)
    if check_config:
        check_model_config(meta, modules, path)
    sharded = _model_sharded_state_dict(modules)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True)
    same_layout = meta["layout"] == _layout()
    restore_rng = load_rng and meta.get("has_rng", False) and same_layout
    if restore_rng:
        sharded["rng_state"] = _rng_sharded_object(None)
    state = dist_checkpointing.load(sharded, path)

    if len(modules) == 1:
        modules[0].load_state_dict(state["model"], strict=strict)
    else:
        for i, module in enumerate(modules):
            module.load_state_dict(state[f"model{i}"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    for module in modules:
        module.eaopd_source = meta.get("source") or f"checkpoint:{path}"
    if restore_rng:
        _restore_rng(state["rng_state"])
    elif load_rng and meta.get("has_rng"):
        logger.info(
            "checkpoint layout %s differs from the current %s: RNG states not restored",
            meta["layout"],
            _layout(),
        )
    logger.info("loaded checkpoint %s (iteration %d)", path, meta["iteration"])
    return LoadedCheckpoint(
        path=path,
        iteration=int(meta["iteration"]),
        extra=dict(meta.get("extra", {})),
        saved_layout=dict(meta["layout"]),
        rng_restored=bool(restore_rng),
    )


def load_teacher(root: str, teacher, iteration: int | None = None) -> LoadedCheckpoint:
    """Load model weights only (a teacher, or a student checkpoint used as a teacher).

    `teacher`: a FrozenTeacher or its chunks, at any TP/PP layout. Optimizer state and RNG in the
    checkpoint are ignored. Collectives: those of load_checkpoint.
    """
    return load_checkpoint(root, teacher, iteration=iteration, load_rng=False)


CHECKSUMS = "checksums.json"


def _file_digests(folder: str) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    import hashlib

    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            out[os.path.relpath(path, folder)] = digest.hexdigest()
    return out


def write_checksums(root: str) -> None:
    """Record the sha256 of every file of the checkpoint ``latest`` names under ``root`` in
    ``root/checksums.json`` (cache entries that other runs load: ``verify_checksums``).
    Call on one rank, after the save. No communication."""
    path = resolve_checkpoint(root)
    digests = {os.path.basename(path): _file_digests(path)}
    _write_atomic(os.path.join(root, CHECKSUMS), json.dumps(digests, indent=1, sort_keys=True))


def verify_checksums(root: str) -> str | None:
    """What differs between the checkpoint ``latest`` names under ``root`` and the checksums
    recorded for it (a truncated, changed or missing file), or None (same, or nothing recorded:
    entries of earlier versions). No communication."""
    record = os.path.join(root, CHECKSUMS)
    if not os.path.isfile(record):
        return None
    try:
        path = resolve_checkpoint(root)
    except FileNotFoundError as err:
        return str(err)
    name = os.path.basename(path)
    try:
        with open(record, encoding="utf-8") as f:
            recorded = json.load(f)[name]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CHECKSUMS} does not describe {name}"
    found = _file_digests(path)
    for rel, digest in sorted(recorded.items()):
        if rel not in found:
            return f"{name}/{rel} is missing"
        if found[rel] != digest:
            return f"{name}/{rel} differs from the file that was saved"
    return None
