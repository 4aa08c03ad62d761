"""The main job: ``eaopd-train --config FILE [dotted.overrides ...]``.

Launch under torchrun (one process per GPU, or per CPU rank with gloo)::

    torchrun --standalone --nproc-per-node=2 -m megatron_eaopd.cli --config configs/tiny-cpu.yaml
    python -m megatron_eaopd.cli --config configs/tiny-cpu.yaml parallel.student.tp=1 \
        parallel.teacher.tp=1                                   # one process, no launcher

Configuration and data problems (unknown keys, bad or non-finite values, a world size that a model's
tp * pp does not divide, settings that cannot run here (``config.checks.check_run``), a top-k beyond
the tokenizer's vocabulary, missing or malformed prompt files, prompts longer than the limit) are
reported before any process group or model is created, with exit status 2, and so is a
``training.output_dir`` that another live run holds (rank 0 locks the folder for the whole run:
``trainer.run_dir``) or that holds an earlier run this one cannot continue
(``trainer.checks.check_output_dir``); each node's local rank 0 prints the message (the node's
other ranks reach the same verdict and record it only in their exit status; a rank refused for
its own GPU, ``LOCAL_RANK``, prints its own). Everything else
is :class:`megatron_eaopd.trainer.Trainer`.

Exit statuses: 0 when the run finished and when it stopped early after saving a checkpoint (on
a preemption signal or the launcher's stop file: ``trainer.preemption``), 2 for a configuration
or data problem, 1 for anything else. Under the project's sbatch scripts each rank also writes
how it ended (``finished``, ``stopped``, ``config_error``, ``failed``) to ``EAOPD_STATUS_DIR``
(``preemption.write_exit_status``): the batch script requeues only a run that stopped early.
"""

from __future__ import annotations

import logging
import os
import re
import sys

__all__ = ["main", "run"]

# what gloo and NCCL raise on the ranks left when one rank of a collective died
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|remote process exited|Broken pipe"
)


def run(cfg, preemption=None, data=None) -> dict:
    """Set up, train and tear down one run of ``cfg`` in this process (one rank of the job).

    ``data``: the config's ``PreparedData`` if already loaded. Returns the trainer's summary.
    The process group is left for the caller to destroy.
    """
    from megatron_eaopd.trainer import Trainer

    trainer = Trainer(cfg, preemption, data)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()


def _world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 without one); ConfigError when malformed."""
    from megatron_eaopd.config import ConfigError

    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError([("WORLD_SIZE", f"{raw!r} is not an integer")]) from None


def _print_before_after(cfg) -> None:
    """The teacher, the student at its first and its last evaluation (from metrics.jsonl)."""
    from megatron_eaopd.eval.report import format_before_after, read_rows
    from megatron_eaopd.trainer.metrics_log import console

    path = os.path.join(cfg.training.output_dir, "metrics.jsonl")
    if os.path.exists(path):
        console(format_before_after(read_rows(path), cfg.eval.k))


def main(argv: list[str] | None = None) -> int:
    """Parse ``--config FILE [key=value ...]``, train, return the exit status; record how this
    rank ended in ``EAOPD_STATUS_DIR`` (a crash is recorded as ``failed 1``, then re-raised)."""
    from megatron_eaopd.trainer.preemption import EXIT_FAILED, write_exit_status

    try:
        return _main(argv)
    except SystemExit as exit_:  # argparse: 2 for a bad command line
        code = exit_.code if isinstance(exit_.code, int) else 1
        if code != 0:
            write_exit_status("config_error" if code == 2 else "failed", code)
        raise
    except BaseException:
        write_exit_status("failed", EXIT_FAILED)
        raise


def _main(argv: list[str] | None) -> int:
    from megatron_eaopd.config import build_arg_parser

    args = build_arg_parser("eaopd-train").parse_args(argv)
    held = []  # rank 0's hold on training.output_dir, for the whole run (trainer.run_dir)
    try:
        return _checked_run(args, held)
    finally:
        for lock in held:
            lock.release()


def _checked_run(args, held: list) -> int:
    """Check, then train ``args``' config; the lock on the run folder (rank 0) goes in ``held``
    as soon as it is taken, for the caller to release after the run."""
    from megatron_eaopd.config import ConfigError, check_run, load_config
    from megatron_eaopd.data import TaskError

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_eaopd.trainer.preemption import PreemptionHandler

    # before the checks and the data preparation: run_local.sh starts the workers with the
    # preemption signals ignored, so one sent during them was lost and the run went to its end
    handler = PreemptionHandler().install()
    try:
        world_size = _world_size()
        cfg = load_config(args.config, args.overrides)
        check_run(cfg, world_size)  # world size, hardware, cross-field rules
        from megatron_eaopd.trainer.loop import (
            check_data_config,
            check_output_dir,
            check_trainer_config,
        )

        check_trainer_config(cfg, world_size)
        if rank == 0:  # the writer of the folder: one live run in it (before anything is written)
            from megatron_eaopd.trainer.run_dir import lock_run_folders

            held.extend(lock_run_folders(cfg))
        check_output_dir(cfg)  # one run per folder
        from megatron_eaopd.data import prepare_data

        data = prepare_data(cfg)  # every data check, before any compute
        check_run(cfg, world_size, data.vocab_size)  # top-k bounded by the vocabulary
        check_data_config(cfg, data, world_size)  # prep batches, exact-form vocabularies
    except (ConfigError, TaskError, ValueError) as err:
        from megatron_eaopd.trainer.preemption import EXIT_CONFIG, write_exit_status

        # every rank of a node checks the same config and files and reaches the same verdict:
        # one copy per node (its local rank 0), not one per GPU; a verdict about this rank's
        # own GPU (LOCAL_RANK) only it reaches
        own = any(key == "LOCAL_RANK" for key, _ in getattr(err, "problems", ()))
        if os.environ.get("LOCAL_RANK", "0") == "0" or own:
            print(f"eaopd-train: {err}", file=sys.stderr)
        handler.uninstall()
        write_exit_status("config_error", EXIT_CONFIG)
        return EXIT_CONFIG
    except BaseException:
        handler.uninstall()
        raise

    import torch.distributed as dist

    from megatron_eaopd.models.save_errors import CheckpointSaveError
    from megatron_eaopd.parallel.init import destroy_parallel
    from megatron_eaopd.trainer.metrics_log import console
    from megatron_eaopd.trainer.preemption import (
        EXIT_CONFIG,
        EXIT_FAILED,
        EXIT_FINISHED,
        write_exit_status,
    )
    from megatron_eaopd.trainer.run_dir import RunRefused
    from megatron_eaopd.trainer.update import NonFiniteUpdateError

    try:
        try:
            summary = run(cfg, handler, data)
        except (RunRefused, NonFiniteUpdateError, CheckpointSaveError) as err:
            refused = isinstance(err, RunRefused)  # the folder's saved run
            prefix = "training failed: "  # diverged
            if refused or isinstance(err, CheckpointSaveError):
                prefix = "" if refused else "checkpoint not saved: "
            # every rank at the same point (one message), but a write that failed on one rank
            if rank == 0 or not getattr(err, "everywhere", True):
                print(f"eaopd-train: {prefix}{err}", file=sys.stderr)
            status, code = ("config_error", EXIT_CONFIG) if refused else ("failed", EXIT_FAILED)
            write_exit_status(status, code)
            return code
        except RuntimeError as err:  # a rank that died took its connections with it
            if not _PEER_GONE.search(str(err)):
                raise
            print(f"eaopd-train: rank {rank} stopped: another rank ended during a collective "
                  f"(its own error is above or in its log): {str(err).splitlines()[0][:200]}",
                  file=sys.stderr)  # fmt: skip
            write_exit_status("failed", EXIT_FAILED)
            return EXIT_FAILED
        stopped = bool(summary["stopped_early"])
        if rank == 0:
            final = summary.get("eval") or {}
            shown = {k: round(v, 4) for k, v in final.items() if isinstance(v, float)}
            at = summary.get("eval_iteration")
            skipped = summary.get("skipped_updates") or 0
            console(
                f"done: iteration {summary['iteration']}/{summary['total_iterations']}"
                f"{' (stopped early)' if summary['stopped_early'] else ''}; "
                + (f"{skipped} non-finite updates skipped; " if skipped else "")
                + (f"last evaluation (iteration {at}) {shown}" if at is not None else
                   "no evaluation in this launch")
            )  # fmt: skip
            _print_before_after(cfg)
    finally:
        handler.uninstall(ignore=True)  # a late copy of the signal must not kill the exit
        destroy_parallel(destroy_process_group=dist.is_initialized())
    write_exit_status("stopped" if stopped else "finished", EXIT_FINISHED, summary["iteration"])
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
