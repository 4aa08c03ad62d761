"""A stand-in for ``megatron_eaopd.cli`` that exercises the launch path without a model.

Run by the launchers in place of the trainer (``EAOPD_ENTRY=tests.launch.standin_trainer``), with
the trainer's command line: ``--config FILE [dotted.key=value ...]``. It does what the real loop
does around the model: installs the preemption handler first, joins a gloo process group from the
torch environment (torchrun or launch/slurm/task.sh), resumes from the latest checkpoint, runs
iterations that each make one all-reduce, prints one metrics line per iteration on rank 0, saves
its iteration counter atomically, and on a preemption signal (or the launcher's stop file) stops
with all ranks at the same iteration, saves, writes its status ``stopped`` and exits 0 so the
batch script requeues the job; a run that reached its last iteration reports ``finished``.

Config keys read (same names as megatron_eaopd.config's schema; ``defaults:`` files are followed):
``training.iterations`` (default 20), ``training.output_dir``, ``training.checkpoint_dir``
(default <output_dir>/checkpoints), ``training.checkpoint_interval`` (0: only at the end and on
preemption), ``standin.step_seconds`` (sleep per iteration, default 0.1) and
``standin.linger_seconds`` (after the last iteration, wait up to this long for a signal before
exiting: a window for a signal that comes after the run finished; default 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_eaopd.trainer.metrics_log import console
from megatron_eaopd.trainer.preemption import PreemptionHandler, requeue_job, write_exit_status

CHECKPOINT_FILE = "latest.json"


def load_config(path: str, overrides: list[str]) -> dict:
    """YAML with a ``defaults:`` chain, then dotted ``key.path=value`` overrides."""

    def load(p: Path) -> dict:
        data = yaml.safe_load(p.read_text()) or {}
        parents = data.pop("defaults", None) or []
        merged: dict = {}
        for parent in [parents] if isinstance(parents, str) else parents:
            merged = merge(merged, load((p.parent / parent).resolve()))
        return merge(merged, data)

    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for key, value in top.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
        return out

    config = load(Path(path).resolve())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not key.path=value")
        node = config
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(raw) if raw.strip() else None
    return config


def read_checkpoint(ckpt_dir: Path) -> int:
    """The last saved iteration, 0 when there is no checkpoint."""
    path = ckpt_dir / CHECKPOINT_FILE
    if not path.exists():
        return 0
    return int(json.loads(path.read_text())["iteration"])


def write_checkpoint(ckpt_dir: Path, iteration: int, reason: str) -> None:
    """Write the iteration counter atomically: a temporary file, fsync, then rename."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"iteration": iteration, "reason": reason, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / CHECKPOINT_FILE)


def main(argv: list[str] | None = None) -> int:
    """Parse, join the group, resume, iterate, save; return the exit status."""
    handler = PreemptionHandler().install()  # first: an early signal must only set the flag
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    training = config.get("training") or {}
    total = int(training.get("iterations") or 20)
    output_dir = Path(training.get("output_dir") or "runs/standin")
    ckpt_dir = Path(training.get("checkpoint_dir") or output_dir / "checkpoints")
    interval = int(training.get("checkpoint_interval") or 0)
    standin = config.get("standin") or {}
    step_seconds = float(standin.get("step_seconds", 0.1))
    linger_seconds = float(standin.get("linger_seconds", 0))

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    start = read_checkpoint(ckpt_dir) + 1
    attempt = os.environ.get("EAOPD_ATTEMPT", os.environ.get("SLURM_RESTART_COUNT", "0"))
    if rank == 0:
        console(f"standin: world_size {world} attempt {attempt} resume_from {start - 1}")

    stopped_at = None
    for iteration in range(start, total + 1):
        value = torch.tensor([float(rank + 1) * iteration])
        dist.all_reduce(value)  # the collective a training step would make
        time.sleep(step_seconds)
        if rank == 0:
            console(f"iteration {iteration}/{total} | loss {value.item():.4f} | world {world}")
        if iteration < total and handler.should_stop():  # after the last one: finished
            stopped_at = iteration
            break
        if interval and iteration % interval == 0 and iteration < total:
            if rank == 0:
                write_checkpoint(ckpt_dir, iteration, "interval")
            dist.barrier()

    last = stopped_at if stopped_at is not None else total
    if rank == 0 and last >= start:
        write_checkpoint(ckpt_dir, last, "preempted" if stopped_at is not None else "end")
    dist.barrier()
    if rank == 0:
        if stopped_at is not None:
            why = handler.reason or "signal on another rank"
            console(f"standin: preempted ({why}) after iteration {stopped_at}, checkpoint saved")
            requeue_job()  # no-op under the project's sbatch scripts (they requeue)
        else:
            console(f"standin: training done at iteration {total}")
    if stopped_at is None and linger_seconds > 0:
        deadline = time.monotonic() + linger_seconds
        while handler.received_signal is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if rank == 0:
            console(f"standin: exiting (signal while lingering: {handler.reason})")
    handler.uninstall(ignore=True)  # as the trainer: a late signal copy must not kill the exit
    dist.destroy_process_group()
    write_exit_status("stopped" if stopped_at is not None else "finished", 0, last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
