"""The on-policy distillation loop: sample, score, update, log, evaluate, checkpoint.

One iteration (the paper's: 128 prompts, mini-batch 32, so 4 optimizer steps)::

    prompts   <- PromptSampler (seeded per-epoch order, resumable)
    rollouts  <- student samples n responses per prompt (KV cache; old log-probs kept)
    payload   <- teacher scores the rollouts (entropy, log-prob of the sampled token, top-k;
                 with loss.form=exact: the teacher's logits shard at the student's layout)
    for each mini-batch of prompts: one optimizer step on the EOPD loss (forward_backward_func)
    log metrics; evaluate every eval_interval; checkpoint every checkpoint_interval

Rollout sampling draws from generators seeded by (seed, iteration, data-parallel rank), the prompt
order is a function of (seed, epoch), and the checkpoint holds the model, optimizer, scheduler,
RNG states and the prompt position: a resumed run repeats the iterations of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_eaopd.config import EAOPDConfig, config_to_dict, objective_kwargs, save_resolved
from megatron_eaopd.config.hf_models import context_warning, tokenizer_warning
from megatron_eaopd.config.rules import (
    interleave_warning,
    recompute_warning,
    unread_loss_warning,
)
from megatron_eaopd.data import prepare_data
from megatron_eaopd.data.sampling import PromptSampler, length_text, run_iterations
from megatron_eaopd.losses import ObjectiveConfig
from megatron_eaopd.parallel.init import rank0_says
from megatron_eaopd.rollout import SamplingParams
from megatron_eaopd.trainer.build import (
    STUDENT,
    TEACHER,
    build_student,
    build_teacher,
    init_layouts,
    model_configs,
)
from megatron_eaopd.trainer.checks import (  # noqa: F401 - the trainer's checks, re-exported
    check_data_config,
    check_output_dir,
    check_trainer_config,
    checkpoint_dir,
    micro_batch_warning,
    sampling_warning,
    will_resume,
)
from megatron_eaopd.trainer.evaluate import (
    check_responses,
    evaluate,
    pad_id_of,
    sample_problems,
    seeded_generator,
)
from megatron_eaopd.trainer.metrics_log import MetricsLogger, console, wandb_warning
from megatron_eaopd.trainer.peak_memory import max_over_ranks, peak_gib, reset_peak
from megatron_eaopd.trainer.run_dir import (
    RunFolderBusy,
    RunRefused,
    evaluated_marker,
    load_for_resume,
    lock_run_folders,
    mark_evaluated,
    planned_iterations,
    set_aside_earlier_attempt,
)
from megatron_eaopd.trainer.teacher_prep import (
    PreparationStopped,
    prepare_student,
    prepare_teacher,
)
from megatron_eaopd.trainer.update import distill_on_rollouts, reduce_outputs, replica_prompts

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "check_trainer_config"]


def _on_terminal() -> bool:
    """Whether stderr, where tqdm draws, is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _tp_ranks(layout: str) -> list[int]:
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import use_layout

    with use_layout(layout):
        return dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())


def _inputs_digest(cfg: EAOPDConfig, data, teacher_cfg) -> dict:
    """Short hashes of what a run trains on beyond its settings' text: the distillation prompts
    (ids, text, answers, in order), the tokenizer, and the prepared teacher's cache key (None
    for a teacher given as a folder or checkpoint: its path is a setting)."""
    import hashlib
    import json

    from megatron_eaopd.trainer.teacher_prep import _fingerprint, supervised_cache_key

    def digest(value) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    given = cfg.model.teacher_hf or cfg.model.teacher_checkpoint
    prepared = cfg.teacher_prep.enabled and not given
    key = supervised_cache_key(data, teacher_cfg, cfg.teacher_prep, "teacher") if prepared else None
    return {
        "distillation prompts": digest([[p.uid, p.prompt, p.answer] for p in data.distill]),
        "tokenizer": digest(_fingerprint(data.tokenizer)),
        "prepared teacher": key,
    }


class Trainer:
    """EOPD / OPD on-policy distillation of one config.

    Args:
        cfg: the validated config.
        preemption: a ``PreemptionHandler`` (or anything with ``should_stop()``), polled once per
            iteration on every rank; when it says stop, the trainer checkpoints and returns.
        data: the ``PreparedData`` of ``cfg`` when the caller has it already; None: prepared in
            :meth:`setup`.
    """

    def __init__(self, cfg: EAOPDConfig, preemption=None, data=None):
        self.cfg = cfg
        self.preemption = preemption
        self.data = data
        self.max_decode_batch = cfg.rollout.max_decode_batch
        self.metrics_logger = None
        self.start_iteration = 0
        self.eval_pending = False
        self.times: dict[str, float] = {}
        self.prep_stopped: str | None = None  # a preparation stopped by a preemption signal
        self.folder_lock = None  # rank 0's holds on the run's folders (trainer.run_dir)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Check data and config (before any compute), start the layouts, prepare/load the
        teacher, build the student, and resume from the latest checkpoint if there is one."""
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if dist.is_initialized():
            world = dist.get_world_size()
        check_trainer_config(cfg, world)
        check_output_dir(cfg)
        self.data = data = self.data or prepare_data(cfg)
        from megatron_eaopd.config import check_run

        check_run(cfg, world, data.vocab_size)  # what needs the vocabulary (top-k bounds)
        check_data_config(cfg, data, world)
        init_layouts(cfg)
        self.rank0 = dist.get_rank() == 0
        self._lock_output_dir()
        for warning in (micro_batch_warning(cfg, world), tokenizer_warning(cfg),
                        sampling_warning(cfg), wandb_warning(cfg),
                        context_warning(cfg), unread_loss_warning(cfg),
                        interleave_warning(cfg), recompute_warning(cfg)):  # fmt: skip
            if warning and self.rank0:
                logger.warning("%s", warning)
        if self.rank0:
            save_resolved(cfg, os.path.join(cfg.training.output_dir, "config.yaml"))
        student_cfg, teacher_cfg = model_configs(cfg, data.vocab_size)
        from megatron_eaopd.models.vocab_check import (
            check_vocab_compatibility,
            tokenizer_fingerprint,
        )

        shared = tokenizer_fingerprint(data.tokenizer)  # one tokenizer serves both models
        check_vocab_compatibility(shared, shared, teacher_cfg.vocab_size, student_cfg.vocab_size)
        t0 = time.perf_counter()
        r = cfg.rollout
        self.total = run_iterations(cfg, len(data.distill))
        if self.rank0:
            console(length_text(cfg, len(data.distill)))
        self.planned = self.total  # a resume takes its checkpoint's (_resume)
        self.steps_per_iteration = r.prompts_per_iteration // r.mini_batch_size
        # a preemption signal stops a preparation too (its progress is saved): see run()
        stop = self.preemption.should_stop if self.preemption is not None else None
        root, init = None, None
        self.ckpt_dir = checkpoint_dir(cfg)
        resuming = rank0_says(will_resume(cfg))  # its checkpoint replaces a student warm start
        self.inputs = _inputs_digest(cfg, data, teacher_cfg)
        if resuming:
            self._check_inputs()
        try:
            if not cfg.model.teacher_hf:
                root = cfg.model.teacher_checkpoint or prepare_teacher(
                    cfg, data, teacher_cfg, show_progress=self._bars_on(), should_stop=stop
                )
            self.teacher = build_teacher(teacher_cfg, root, cfg.model.teacher_hf)
            self.times["teacher_prep"] = time.perf_counter() - t0
            if (
                cfg.model.student_checkpoint is None
                and not cfg.model.student_hf
                and cfg.student_prep.enabled
                and not resuming
            ):
                init = prepare_student(cfg, data, student_cfg, show_progress=self._bars_on(),
                                       should_stop=stop)  # fmt: skip
        except PreparationStopped as err:
            self.prep_stopped = str(err)
            return self
        self.student = build_student(
            cfg, student_cfg, self.total * self.steps_per_iteration, init_checkpoint=init
        )
        self.student.max_skipped_in_a_row = cfg.training.max_skipped_in_a_row
        self.objective = ObjectiveConfig(**objective_kwargs(cfg.loss))
        self.exact = self.objective.form == "exact"
        if self.exact:
            if _tp_ranks(STUDENT) != _tp_ranks(TEACHER):
                raise ValueError("loss.form=exact: the student and teacher TP groups differ")
        self.sampler = PromptSampler(len(data.distill), r.prompts_per_iteration, cfg.training.seed)
        if resuming:
            self._resume()
        self.metrics_logger = MetricsLogger(
            cfg.training.output_dir,
            cfg.logging,
            run_name=cfg.name,
            config_dict=config_to_dict(cfg),
            enabled=self.rank0,
            resume_iteration=self.start_iteration,
        )
        return self

    def _lock_output_dir(self) -> None:
        """Rank 0, the writer of the run folder, holds its lock until :meth:`close`, and moves
        aside the records of an earlier attempt that saved no checkpoint before a fresh start
        (``trainer.run_dir``). Every rank raises when another live run holds the folder.
        Collectives: 1 broadcast."""
        busy = None
        if self.rank0:
            try:
                self.folder_lock = lock_run_folders(self.cfg)
            except RunFolderBusy as err:
                busy = err
        if rank0_says(busy is not None):
            raise busy or RunFolderBusy(
                f"training.output_dir={self.cfg.training.output_dir} (or its checkpoint_dir) "
                "is in use by another run"
            )
        if self.rank0 and not will_resume(self.cfg):  # a run that died before its 1st save
            set_aside_earlier_attempt(self.cfg.training.output_dir)

    def _check_inputs(self) -> None:
        """A resume whose distillation prompts, tokenizer or prepared teacher differ from the
        saved run's (a prompt file edited in place, a retrained tokenizer: the config text is
        the same) is refused before any preparation. Checkpoints without the record (older
        versions) are not compared. Reads the latest checkpoint's metadata; no communication."""
        from megatron_eaopd.models.checkpoint import read_meta, resolve_checkpoint

        path = resolve_checkpoint(self.ckpt_dir)
        name = os.path.basename(path)
        saved = read_meta(path).get("extra", {}).get("inputs")
        if saved is None or saved == self.inputs:
            return
        changed = [k for k in saved if saved[k] != self.inputs.get(k)]
        raise RunRefused(
            f"training.output_dir={self.cfg.training.output_dir} holds a run ({name}) trained "
            f"on other inputs: {', '.join(changed)} differ, with the same settings (a prompt "
            "file edited in place, a retrained or replaced tokenizer, another prepared "
            "teacher). Resuming would continue that run on them. Use a new "
            "training.output_dir, or restore the inputs"
        )

    def _resume(self) -> None:
        from megatron_eaopd.parallel.init import use_layout

        with use_layout(STUDENT):
            loaded = load_for_resume(self.ckpt_dir, self.student)
        self.start_iteration = loaded.iteration
        self.eval_pending = bool(loaded.extra.get("eval_pending", False))
        self.sampler.load_state_dict(loaded.extra["sampler"])
        self.student.skipped_updates = int(loaded.extra.get("skipped_updates", 0))
        self.student.skipped_in_a_row = int(loaded.extra.get("skipped_in_a_row", 0))
        self.planned = planned_iterations(loaded.extra, self.total)
        if self.planned != self.total:
            logger.warning(
                "resuming with %d total iterations, the schedule was planned for %d: the "
                "learning-rate schedule (warm-up, decay horizon, peak and final lr) continues as "
                "saved in the checkpoint (megatron's scheduler state), not from the new config",
                self.total, self.planned,
            )  # fmt: skip
        if self.rank0:
            console(f"resumed from {loaded.path} (iteration {loaded.iteration})")

    # -- helpers -----------------------------------------------------------------------------------
    def _bars_on(self) -> bool:
        """Progress bars: asked for, rank 0, and stderr (tqdm's stream) is a terminal; in a log
        file or a pipe each redraw would add a line fragment (and break srun's rank labels)."""
        return self.cfg.logging.progress_bars and dist.get_rank() == 0 and _on_terminal()

    def progress(self, total: int, desc: str):
        """A tqdm bar on rank 0 when progress bars are on, else None."""
        if not self._bars_on():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def _dp_sum(self, values: list[float]) -> list[float]:
        from megatron.core import parallel_state as ps

        from megatron_eaopd.parallel.init import compute_device

        t = torch.tensor(values, dtype=torch.float64, device=compute_device())
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        return t.tolist()

    # -- the iteration -----------------------------------------------------------------------------
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One iteration: sample, score, update. Returns the metrics (same on every rank)."""
        from megatron.core import parallel_state as ps

        from megatron_eaopd.parallel.init import use_layout

        cfg, data, r = self.cfg, self.data, self.cfg.rollout
        t_start = time.perf_counter()
        reset_peak()
        params = SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            logprob_temperature=cfg.loss.temperature,
        )  # fmt: skip
        n = r.samples_per_prompt
        with use_layout(STUDENT):
            dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            indices = self.sampler.next_batch()
            mine = [
                data.distill[i] for i in replica_prompts(indices, r.mini_batch_size, dp, dp_rank)
            ]
            gen = seeded_generator(cfg.training.seed, "rollout", iteration, dp_rank)
            rollouts, correct = None, []
            if mine:  # none when the mini-batch has fewer prompts than there are replicas
                bar = self.progress(len(mine) * n, f"rollout {iteration}")
                rollouts = sample_problems(
                    self.student.chunks, mine, n, data.tokenizer,
                    max_new_tokens=r.max_response_tokens, params=params,
                    vocab_size=data.vocab_size, generator=gen, use_kv_cache=r.use_kv_cache,
                    max_batch=self.max_decode_batch, progress=bar.update if bar else None,
                    pp_interleave=r.pp_interleave,
                    decode_graphs=r.cuda_graphs,
                )  # fmt: skip
                if bar is not None:
                    bar.close()
        t_rollout = time.perf_counter()
        memory_rollout = peak_gib()
        reset_peak()
        if rollouts is not None:
            correct = check_responses(data.task, data.tokenizer, mine, rollouts, n)
        n_correct = sum(sum(row) for row in correct)
        local = [
            n_correct,
            float(len(mine) * n),
            float(rollouts.response_lens.sum()) if rollouts is not None else 0.0,
            float(rollouts.finished.sum()) if rollouts is not None else 0.0,
        ]
        bar = self.progress(self.steps_per_iteration, f"update {iteration}")
        done = distill_on_rollouts(
            self.student, self.teacher, self.objective, rollouts,
            steps=self.steps_per_iteration, micro_batch_size=r.micro_batch_size,
            pad_id=pad_id_of(data.tokenizer), vocab_size=data.vocab_size, top_k=cfg.loss.top_k,
            temperature=cfg.loss.temperature, chunk_size=cfg.loss.chunk_size,
            skip_nonfinite=cfg.training.skip_nonfinite,
            progress=bar.update if bar is not None else None,
            micro_batch_tokens=r.micro_batch_tokens,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        # kept for inspection without the teacher's tensors (the exact form's logits shard would
        # otherwise stay alive through the next iteration's rollout and scoring)
        self.last_micro_batches = [{k: v for k, v in mb.items() if k != "teacher"}
                                   for mb in done["micro"]]  # fmt: skip
        grad_norms, step_metrics = done["grad_norms"], done["last"]
        with use_layout(STUDENT):
            metrics = reduce_outputs(done["outputs"])
            totals = self._dp_sum(local)
        t_end = time.perf_counter()
        memory = max_over_ranks([memory_rollout, peak_gib()])
        finite = [g for g in grad_norms if g == g]
        metrics.update(
            reward=totals[0] / totals[1],
            response_length=totals[2] / totals[1],
            finished_frac=totals[3] / totals[1],
            grad_norm=sum(finite) / len(finite) if finite else float("nan"),
            lr=step_metrics.get("lr", float("nan")),
            skipped_updates=float(self.student.skipped_updates),
            tokens_per_s=totals[2] / max(t_rollout - t_start, 1e-9),
            time_rollout=t_rollout - t_start,
            time_teacher=done["time_teacher"],
            time_update=done["time_update"],
            time_iteration=t_end - t_start,
            memory_rollout_gib=memory[0],
            memory_update_gib=memory[1],
            epoch=float(self.sampler.epoch),
        )
        return metrics

    # -- the run -----------------------------------------------------------------------------------
    def _stop_requested(self, iteration: int) -> bool:
        """A preemption / time-limit signal arrived (every rank agrees: ``should_stop``) before
        the last iteration (after it the run finishes instead)."""
        return (
            iteration < self.total and self.preemption is not None and self.preemption.should_stop()
        )

    def _evaluated(self, iteration: int) -> bool:
        """Whether the evaluation of ``iteration``'s checkpoint ran (one broadcast)."""
        return rank0_says(self.rank0 and evaluated_marker(self.ckpt_dir, iteration))

    def _mark_evaluated(self, iteration: int) -> None:
        if self.rank0:  # a resumed or shortened run does not repeat it
            mark_evaluated(self.ckpt_dir, iteration)

    def _due(self, interval: int, iteration: int) -> bool:
        return iteration == self.total or (interval > 0 and iteration % interval == 0)

    def run_eval(self, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = evaluate(self, iteration)
        metrics["time_eval"] = time.perf_counter() - t0
        self.metrics_logger.log("eval", iteration, metrics)
        return metrics

    def save(self, iteration: int, eval_pending: bool = False) -> None:
        """Checkpoint after ``iteration``; ``eval_pending``: the evaluation due at this iteration
        has not run yet (preempted first), so a resumed run starts with it."""
        from megatron_eaopd.models.checkpoint import save_checkpoint
        from megatron_eaopd.parallel.init import use_layout

        extra = {
            "sampler": self.sampler.state_dict(),
            "skipped_updates": self.student.skipped_updates,
            "skipped_in_a_row": self.student.skipped_in_a_row,
            "total_iterations": self.total,
            # the length the learning-rate schedule was built for: the first attempt's
            # (megatron's scheduler state, restored on resume, keeps its decay horizon)
            "planned_iterations": self.planned,
            "eval_pending": bool(eval_pending),
            # the run folder these checkpoints belong to (trainer.checks.check_output_dir)
            "output_dir": os.path.abspath(self.cfg.training.output_dir),
            # its settings, compared on resume where the run folder's config.yaml is gone
            "config": config_to_dict(self.cfg),
            "inputs": self.inputs,  # what the config text does not show (_check_inputs)
        }
        with use_layout(STUDENT):
            s = self.student
            save_checkpoint(self.ckpt_dir, iteration, s.chunks, s.optimizer, s.scheduler, extra)
        keep = self.cfg.training.keep_checkpoints
        if keep and self.rank0:  # after the save's closing barrier: the new one is complete
            from megatron_eaopd.models.checkpoint import prune_checkpoints

            for path in prune_checkpoints(self.ckpt_dir, keep):
                logger.info("deleted the older checkpoint %s (training.keep_checkpoints)", path)

    def run(self) -> dict:
        """Train from ``start_iteration`` to the end (or until preempted); return a summary."""
        cfg = self.cfg
        last_train, last_eval, stopped, eval_at = {}, {}, False, None
        if self.prep_stopped is not None:  # setup stopped in a preparation, its progress saved
            if self.rank0:
                console(f"preempted: {self.prep_stopped}")
            self._requeue()
            return {"iteration": 0, "total_iterations": self.total, "stopped_early": True,
                    "train": {}, "eval": {}, "output_dir": cfg.training.output_dir}  # fmt: skip
        if self.start_iteration == 0 and cfg.training.eval_at_start:
            teacher_metrics = evaluate(self, 0, who="teacher")
            self.metrics_logger.log("teacher", 0, teacher_metrics)
            last_eval, eval_at = self.run_eval(0), 0
        # saved before this evaluation, or the run (shortened) ends where it was saved
        at_end = self.start_iteration == self.total
        if self.start_iteration > 0 and (self.eval_pending or at_end):
            if not self._evaluated(self.start_iteration):
                last_eval, eval_at = self.run_eval(self.start_iteration), self.start_iteration
                self._mark_evaluated(self.start_iteration)
            self.eval_pending = False
        iteration = self.start_iteration
        while iteration < self.total:
            iteration += 1
            last_train = self.train_iteration(iteration)
            if iteration % cfg.logging.log_interval == 0 or iteration == self.total:
                self.metrics_logger.log("train", iteration, last_train)
            # A stop request after the last iteration is not a stop: the run finishes (final
            # evaluation, export) and reports itself finished, so it is not requeued.
            eval_due = self._due(cfg.training.eval_interval, iteration)
            save_due = self._due(cfg.training.checkpoint_interval, iteration)
            stopped = self._stop_requested(iteration)
            if stopped:
                self.save(iteration, eval_pending=eval_due)
                self._requeue()
                break
            if eval_due and save_due:  # keep the update before a long evaluation (a crash or the
                self.save(iteration, eval_pending=True)  # time limit in it loses nothing)
            if eval_due:
                last_eval, eval_at = self.run_eval(iteration), iteration
                if save_due:
                    self._mark_evaluated(iteration)
            elif save_due:
                self.save(iteration)
            if eval_due and self._stop_requested(iteration):  # asked during the evaluation
                if not save_due:
                    self.save(iteration)
                    self._mark_evaluated(iteration)  # it ran: a shortened relaunch must not
                stopped = True
                self._requeue()
                break
        if self.rank0 and not stopped and cfg.eval.plot:
            self._plot()
        if not stopped and cfg.training.export_hf:
            self.export_hf(cfg.training.export_hf)
        return {
            "iteration": iteration,
            "total_iterations": self.total,
            "stopped_early": stopped,
            "train": last_train,
            "eval": last_eval,
            "eval_iteration": eval_at,  # the evaluation "eval" is of (None: none in this call)
            "output_dir": cfg.training.output_dir,
            "skipped_updates": self.student.skipped_updates,  # non-finite, over the whole run
        }

    def export_hf(self, out_dir: str) -> str:
        """Write the student as a Hugging Face folder (``models.hf.save_hf_weights``; every rank
        calls it). The tokenizer's files are copied when the tokenizer is an HF folder. The
        folder is written under a temporary name and renamed when complete; an existing one (an
        earlier export: ``trainer.checks`` refuses any other folder at startup) is replaced only
        then."""
        from megatron_eaopd.models.hf import save_hf_weights
        from megatron_eaopd.parallel.init import use_layout

        cfg = self.cfg
        tok = cfg.tokenizer.path if cfg.tokenizer.kind == "huggingface" else None
        tok = tok if tok and os.path.isdir(tok) else None
        ids, spm = None, None
        if tok is None:  # no folder to copy: the special ids into the configs, so that
            from megatron_eaopd.data.sequences import bos_id, eos_id  # transformers' generate
            from megatron_eaopd.trainer.evaluate import pad_id_of  # stops at the run's EOS

            t = self.data.tokenizer  # each None or a valid id (-1: none)
            ids = {"bos_token_id": bos_id(t), "eos_token_id": eos_id(t),
                   "pad_token_id": pad_id_of(t)}  # fmt: skip
            spm = getattr(t, "path", None) if cfg.tokenizer.kind != "huggingface" else None
        gen = None  # the folder's generation config, with the run's stop ids it lacks
        if tok is not None:
            from megatron_eaopd.data.sequences import stop_token_ids
            from megatron_eaopd.models.hf.save import generation_config_with_stops

            gen = generation_config_with_stops(tok, stop_token_ids(self.data.tokenizer))
        with use_layout(STUDENT):
            save_hf_weights(
                self.student.chunks, out_dir, dtype=cfg.training.export_dtype, tokenizer_dir=tok,
                token_ids=ids, generation_config=gen, overwrite=True, progress=self._bars_on(),
                export_info={"run": cfg.name,
                             "output_dir": os.path.abspath(cfg.training.output_dir)},
            )  # fmt: skip
        if self.rank0:
            console(f"exported the student to {out_dir}")
            if spm is not None:
                logger.warning(
                    "%s holds no Hugging Face tokenizer: the run's tokenizer is the sentencepiece "
                    "model %s (its BOS / EOS / pad ids %s / %s / %s are in config.json and "
                    "generation_config.json); encode with it, prompts as [BOS] + ids",
                    out_dir, spm, ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"],
                )  # fmt: skip
        return out_dir

    def _requeue(self) -> None:
        from megatron_eaopd.trainer.preemption import requeue_job

        dist.barrier()
        if self.rank0:
            console("preempted: checkpoint saved, stopping")
            requeue_job()

    def _plot(self) -> None:
        from megatron_eaopd.eval.report import plot_run_file

        png = os.path.join(self.cfg.training.output_dir, "eval_curves.png")
        plot_run_file(self.metrics_logger.path, png, self.cfg.eval.k, self.cfg.name)

    def close(self) -> None:
        if self.metrics_logger is not None:
            self.metrics_logger.close()
        for lock in self.folder_lock or ():
            lock.release()
        self.folder_lock = None
