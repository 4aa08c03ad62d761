"""Teacher preparation (and the optional student warm start): supervised training on the task's
reference solutions.

Runs once per (role, task, tokenizer, model shape, ``teacher_prep`` / ``student_prep`` settings):
the result is saved as a model-only checkpoint under ``<prep>.cache_dir/<key>/`` and every later
run with the same key loads it. A preemption signal during it (``should_stop``) saves the model,
optimizer and schedule under ``<key>.partial/`` and stops (``PreparationStopped``); the next run
continues from there with the same example draws, so the result is that of an uninterrupted
preparation. The key hashes everything that changes the trained weights, so
changing the task or the teacher's shape prepares a new teacher, and changing the loss does not.

The training: AdamW with linear warm-up and cosine decay, ``batch_size`` examples per step drawn
uniformly (with a generator seeded by ``teacher_prep.seed``) from all (prompt, solution) pairs, the
loss on solution and EOS tokens only. Since a training problem has several valid solutions, the
teacher learns a distribution with genuine uncertainty at the branch points of a solution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time

import torch.distributed as dist

from megatron_eaopd.config import EAOPDConfig
from megatron_eaopd.data.sequences import build_sft_example
from megatron_eaopd.models import ModelConfig
from megatron_eaopd.trainer.batches import sft_micro_batches
from megatron_eaopd.trainer.build import STUDENT, TEACHER, build_trainable
from megatron_eaopd.trainer.update import NonFiniteUpdateError, optimizer_step, sft_forward_step

logger = logging.getLogger(__name__)

__all__ = [
    "PreparationStopped",
    "prepare_student",
    "prepare_supervised",
    "prepare_teacher",
    "supervised_cache_key",
]


class PreparationStopped(Exception):
    """A preparation stopped by a preemption signal after saving its progress (``<key>.partial``
    next to the cache entry); the next run with the same key continues it."""


def _fingerprint(obj) -> str:
    """What identifies a tokenizer in a preparation's key: its own fingerprint (the project's
    tokenizers); for a Hugging Face tokenizer its id -> piece table and special ids, and the
    chat template with its arguments when prompts are wrapped in it (not its folder's path:
    one folder refilled, or spelled two ways, is another or the same tokenizer)."""
    value = getattr(obj, "fingerprint", None)
    value = value() if callable(value) else value
    if value is not None:
        return str(value)
    if hasattr(obj, "get_vocab"):
        from megatron_eaopd.data.sequences import CHAT_ATTR
        from megatron_eaopd.models.vocab_check import tokenizer_fingerprint

        chat = getattr(obj, CHAT_ATTR, None)
        template = getattr(obj, "chat_template", None) if chat is not None else None
        ids = [getattr(obj, f"{t}_token_id", None) for t in ("bos", "eos", "pad")]
        return json.dumps([tokenizer_fingerprint(obj).digest, ids, chat, template],
                          sort_keys=True, default=str)  # fmt: skip
    return getattr(obj, "name_or_path", type(obj).__name__)


def supervised_cache_key(data, mcfg: ModelConfig, prep_cfg, role: str = "teacher") -> str:
    """A short hash of everything that determines a prepared model's weights."""
    prep = dataclasses.asdict(prep_cfg)
    prep.pop("cache_dir")
    prep.pop("enabled")
    model = mcfg.to_dict()
    # export metadata, not training: its absence keeps the keys of earlier versions' caches
    if model.get("hf_max_position_embeddings") is None:
        model.pop("hf_max_position_embeddings", None)
    # derived from the rollout and evaluation limits; the trained weights do not depend on it
    # (RoPE, no learned positions; examples longer than it are refused, not cut): another
    # evaluation length must not prepare the models again
    model.pop("max_sequence_length", None)
    blob = json.dumps(
        {
            "role": role,
            "task": data.task.fingerprint(),
            "tokenizer": _fingerprint(data.tokenizer),
            "model": model,
            "prep": prep,
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _examples(data, max_len: int, num_problems=None) -> list[tuple[list[int], list[int]]]:
    out = []
    problems = list(data.task.train_problems())
    for problem in problems[:num_problems] if num_problems else problems:
        for solution in problem.solutions:
            out.append(build_sft_example(data.tokenizer, problem.prompt, solution, max_len))
    if not out:
        raise ValueError("teacher preparation needs training problems with solutions")
    return out


def _exists_everywhere(path: str) -> bool:
    """Rank 0's view of whether ``path`` exists, shared with every rank (one broadcast)."""
    from megatron_eaopd.parallel.init import rank0_says

    return rank0_says(os.path.isfile(path))


@contextlib.contextmanager
def _entry_lock(root: str, role: str, poll: float = 5.0, should_stop=None):
    """Hold ``<root>.lock`` (rank 0: an exclusive ``fcntl.flock``, released by the kernel when
    the process dies) while this job prepares the cache entry ``root``: a second job with the
    same key (a sweep started at once) waits here, then finds the entry cached, instead of
    writing the same folders. On a filesystem without locks, a warning and no lock. While it
    waits, ``should_stop`` (asked on every rank after each try) True raises
    ``PreparationStopped``: a preempted job ends as stopped and is requeued.
    Collectives: 1 broadcast of one int per try (every ``poll`` seconds while another job
    holds the lock), so no rank sits in a long collective."""
    from megatron_eaopd.parallel.init import rank0_says
    from megatron_eaopd.trainer.run_dir import try_flock

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    handle, told = None, False
    if rank0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
            handle = open(root + ".lock", "a+", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            logger.warning("cannot open %s.lock (%s): preparing without a lock", root, err)
    while True:
        got = 1
        if handle is not None:
            try:
                got = int(try_flock(handle))
            except OSError as err:  # no locks here (some network filesystems)
                logger.warning("no file lock on %s.lock (%s): preparing without one", root, err)
                handle.close()
                handle = None
        if rank0_says(got):
            break
        if rank0 and not told:
            logger.warning("another job is preparing the %s %s: waiting for it", role, root)
            told = True
        if should_stop is not None and should_stop():
            if handle is not None:
                handle.close()
            raise PreparationStopped(
                f"stopped while another job prepares the {role} {root} (the next run uses it)"
            )
        time.sleep(poll)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # the last descriptor of the file: the flock goes with it


def prepare_teacher(cfg: EAOPDConfig, data, mcfg: ModelConfig, show_progress: bool = True,
                    should_stop=None) -> str:  # fmt: skip
    """Checkpoint root of the teacher prepared by ``cfg.teacher_prep`` (trained if not cached)."""
    return prepare_supervised(data, mcfg, cfg.teacher_prep, TEACHER, "teacher", show_progress,
                              should_stop, cfg.training.max_skipped_in_a_row)  # fmt: skip


def prepare_student(cfg: EAOPDConfig, data, mcfg: ModelConfig, show_progress: bool = True,
                    should_stop=None) -> str:  # fmt: skip
    """Checkpoint root of the student warm-started by ``cfg.student_prep`` (trained if not
    cached); the trainer loads its weights into the student before distillation."""
    return prepare_supervised(data, mcfg, cfg.student_prep, STUDENT, "student", show_progress,
                              should_stop, cfg.training.max_skipped_in_a_row)  # fmt: skip


def prepare_supervised(
    data, mcfg: ModelConfig, prep, layout: str, role: str, show_progress: bool = True,
    should_stop=None, max_skipped_in_a_row: int = 0,
) -> str:  # fmt: skip
    """Return the checkpoint root of a model trained by ``prep``, training it if not cached.

    Call on every rank. Training runs under ``layout``; the data-parallel ranks of that layout
    split each step's batch. ``should_stop``: called after every step on every rank (a
    ``PreemptionHandler.should_stop``, which all ranks answer alike); True saves the progress
    under ``<root>.partial`` and raises ``PreparationStopped``; a later call continues from it.
    Another job preparing the same entry holds ``<root>.lock``: this one waits for it, then
    uses the entry it saved (``_entry_lock``). ``max_skipped_in_a_row``: stop (raise
    ``NonFiniteUpdateError``) at that many non-finite steps in a row; 0: never.
    Collectives: those of the training steps, of ``should_stop`` and of the checkpoint saves.
    """
    from megatron_eaopd.models.checkpoint import LATEST

    root = os.path.join(prep.cache_dir, supervised_cache_key(data, mcfg, prep, role))
    if _exists_everywhere(os.path.join(root, LATEST)):
        return _use_cached(root, role)
    with _entry_lock(root, role, should_stop=should_stop):
        if _exists_everywhere(os.path.join(root, LATEST)):  # another job saved it meanwhile
            return _use_cached(root, role)
        return _train_entry(data, mcfg, prep, layout, role, show_progress, should_stop, root,
                            max_skipped_in_a_row)  # fmt: skip


def _use_cached(root: str, role: str) -> str:
    """The saved entry ``root``, its files verified against their checksums by rank 0
    (ValueError on every rank naming a damaged file). Collectives: 1 broadcast_object_list."""
    from megatron_eaopd.models.checkpoint import verify_checksums
    from megatron_eaopd.parallel.init import rank0_object

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    damaged = rank0_object(verify_checksums(root) if rank0 else None)
    if damaged:
        raise ValueError(
            f"the cached {role} {root} is damaged ({damaged}): delete that folder to "
            "prepare it again"
        )
    logger.info("using the cached %s %s", role, root)
    if rank0 and os.path.isdir(root + ".partial"):  # killed between the save and its removal
        shutil.rmtree(root + ".partial", ignore_errors=True)
    return root


def _train_entry(
    data, mcfg, prep, layout, role, show_progress, should_stop, root, max_skipped_in_a_row=0
) -> str:
    """Train the entry ``root`` (continuing a ``.partial`` one), save it with its checksums."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.checkpoint import (
        LATEST,
        load_checkpoint,
        prune_checkpoints,
        save_checkpoint,
        write_checksums,
    )
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.parallel.init import use_layout

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    fix = (f"move the cache folder {prep.cache_dir} to another disk and set {role}_prep.cache_dir "
           "to its new place (an empty one prepares from the start), then run the same command "
           "again: the preparation continues from its last save")  # fmt: skip
    examples = _examples(data, mcfg.max_sequence_length, getattr(prep, "num_problems", None))
    optim = OptimConfig(
        lr=prep.lr,
        weight_decay=prep.weight_decay,
        warmup_steps=prep.warmup_iterations,
        total_steps=max(prep.iterations, 1),
        clip_grad=1.0,
    )
    pad_id = int(getattr(data.tokenizer, "pad_id", 0) or 0)
    order = random.Random(prep.seed)
    start, log = time.perf_counter(), []
    with use_layout(layout):
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if prep.batch_size % dp != 0:
            raise ValueError(f"{role}_prep.batch_size={prep.batch_size} must divide by DP={dp}")
        model = build_trainable(mcfg, optim, prep.seed)
        model.max_skipped_in_a_row = max_skipped_in_a_row
        partial, first = root + ".partial", 0
        if _exists_everywhere(os.path.join(partial, LATEST)):  # a stopped preparation
            loaded = load_checkpoint(partial, model.chunks, model.optimizer, model.scheduler,
                                     load_rng=False)  # fmt: skip
            first, log = loaded.iteration, list(loaded.extra.get("log", []))
            model.skipped_updates = int(loaded.extra.get("skipped_updates", 0))
            logger.info("continuing the %s preparation at step %d: %s", role, first, partial)
        forward_step = sft_forward_step(data.vocab_size)
        bar = _progress(prep.iterations, f"{role} prep", show_progress and rank0)
        if bar is not None:
            bar.update(first)
        for step in range(prep.iterations):
            batch = [examples[order.randrange(len(examples))] for _ in range(prep.batch_size)]
            if step < first:  # done before the stop: the same draws, in order
                continue
            mine = batch[dp_rank::dp]
            micro, seq = sft_micro_batches(mine, pad_id, len(mine))
            try:
                metrics, _ = optimizer_step(model, forward_step, micro, seq, len(mine),
                                            metric_names=["loss"])  # fmt: skip
            except NonFiniteUpdateError as err:  # every rank: the decision is global
                raise NonFiniteUpdateError(
                    f"the {role} preparation diverged at step {step + 1} of {prep.iterations} "
                    f"({model.skipped_in_a_row} non-finite steps in a row, skipped): lower "
                    f"{role}_prep.lr (its gradients are "
                    f"clipped at 1.0) or raise {role}_prep.warmup_iterations; nothing was "
                    "cached, so the next run prepares it again"
                ) from err
            log.append({"step": step + 1, "loss": metrics["loss"], "lr": metrics["lr"]})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if step + 1 < prep.iterations and should_stop is not None and should_stop():
                if bar is not None:
                    bar.close()
                extra = {"log": log, "skipped_updates": model.skipped_updates}
                save_checkpoint(partial, step + 1, model.chunks, model.optimizer,
                                model.scheduler, extra=extra, save_rng=False, fix=fix)  # fmt: skip
                if rank0:  # after the save's closing barrier: one copy, however many stops
                    prune_checkpoints(partial, 1)
                raise PreparationStopped(
                    f"the {role} preparation stopped at step {step + 1} of {prep.iterations} "
                    f"(saved under {partial}; the next run continues it)"
                )
        if bar is not None:
            bar.close()
        extra = {
            "key": os.path.basename(root),
            "final_loss": log[-1]["loss"] if log else None,
            "seconds": time.perf_counter() - start,
            "skipped_updates": model.skipped_updates,
        }
        save_checkpoint(root, prep.iterations, model.chunks, extra=extra, save_rng=False, fix=fix)
    if rank0:  # after the save's closing barrier: what later runs verify before loading it
        write_checksums(root)
    if rank0 and os.path.isdir(partial):  # after the save's closing barrier
        shutil.rmtree(partial, ignore_errors=True)
    if rank0:
        with open(os.path.join(root, f"{role}_prep.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in log)
        logger.info("prepared the %s in %.1f s: %s", role, extra["seconds"], root)
    return root


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
