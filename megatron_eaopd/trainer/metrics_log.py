"""Where metrics go: a JSONL log, the console, TensorBoard and W&B (the last two when installed).

Only rank 0 writes. Every record is one JSON object per line of ``<output_dir>/metrics.jsonl``:
``{"split": "train" | "eval" | "teacher", "iteration": N, ...metrics}``. On resume, records past the
checkpoint's iteration (written after the checkpoint by the interrupted run) are taken out first,
so the log reads as if the run had never stopped: they are moved, with the evaluation samples of
those iterations, to the run folder's ``earlier_attempts/`` (``trainer.run_dir``), never deleted.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "wandb_warning"]


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl file (optionally of one split). A line that is not a JSON
    record (the last one of a killed run, cut short mid-write) is skipped with a warning."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                logger.warning("%s line %d is not a JSON record (cut short?): skipped", path,
                               number)  # fmt: skip
                continue
            if isinstance(row, dict) and (split is None or row.get("split") == split):
                rows.append(row)
    return rows


def console(text: str) -> None:
    """Print ``text`` and its newline in one write, flushed. print() writes the two separately,
    and under PYTHONUNBUFFERED (the launchers set it) another process's output, or torchrun's
    line prefix, could land between them in a shared log (a parsed line then ran into the next
    rank's prefix)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _wandb_run_id(output_dir: str) -> str:
    """The W&B run id of this run folder, kept in ``<output_dir>/wandb_run_id``: every attempt of
    a requeued or resumed run logs to the same W&B run (without an id, each made a new one)."""
    import uuid

    path = os.path.join(output_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:16]
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    return run_id


class MetricsLogger:
    """Log metric dicts to JSONL / console / TensorBoard / W&B.

    Args:
        output_dir: the run folder.
        logging_cfg: ``cfg.logging`` (console, jsonl, tensorboard, wandb, wandb_* fields).
        run_name: W&B run name default.
        config_dict: the resolved config (W&B run config).
        enabled: False on every rank but 0.
        resume_iteration: move the JSONL records and eval_samples files of iterations above
            this to ``earlier_attempts/`` (``run_dir.set_aside_after``); 0, a fresh start: every
            record of an earlier attempt (``run_dir.set_aside_earlier_attempt``); None: keep
            all.
    """

    def __init__(
        self,
        output_dir: str,
        logging_cfg,
        run_name: str = "eaopd",
        config_dict: Mapping | None = None,
        enabled: bool = True,
        resume_iteration: int | None = None,
    ):
        self.enabled = enabled
        self.cfg = logging_cfg
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        self.wandb = None
        self.jsonl_off = False  # set when a write failed (a full disk): warned once
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_iteration is not None:
            from megatron_eaopd.trainer.run_dir import set_aside_after, set_aside_earlier_attempt

            if resume_iteration == 0:
                set_aside_earlier_attempt(output_dir)
            else:
                set_aside_after(output_dir, resume_iteration)
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resume drops the event files' steps after the checkpoint (a run that died
                # after its last save logged them once already), as the JSONL's are moved aside
                purge = None if resume_iteration is None else resume_iteration + 1
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)
                _quiet_writer_thread()
            except ImportError:
                logger.info("tensorboard is not installed: no event files")
        if logging_cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=logging_cfg.wandb_project,
                    entity=logging_cfg.wandb_entity,
                    name=logging_cfg.wandb_run_name or os.path.basename(output_dir.rstrip("/")),
                    config=dict(config_dict or {}),
                    dir=output_dir,
                    id=_wandb_run_id(output_dir),
                    resume="allow",
                )
            except ImportError:  # the trainer's start warned (wandb_warning): once is enough
                logger.debug("logging.wandb is on but wandb is not installed (pip install wandb)")
            except Exception as err:  # noqa: BLE001 - no login, no network: the run goes on
                logger.warning(
                    "W&B is off for this run: wandb.init failed (%s: %s). Metrics still go to "
                    "%s. Log in (`wandb login`, or WANDB_API_KEY), or set WANDB_MODE=offline "
                    "on nodes without network and `wandb sync` later", type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "", self.path,
                )  # fmt: skip
                self.wandb = None

    def log(self, split: str, iteration: int, metrics: Mapping[str, float]) -> None:
        """Write one record (rank 0 only; others return at once)."""
        if not self.enabled:
            return
        record = {"split": split, "iteration": iteration}
        record.update({k: _clean(v) for k, v in metrics.items()})
        if self.cfg.jsonl and not self.jsonl_off:
            try:
                _append_line(self.path, json.dumps(record) + "\n")
            except OSError as err:  # a full disk must not end training (checkpoints may fit)
                logger.warning("metrics.jsonl is off from this record (%s %d): %s; the run goes "
                               "on, the console log has every record, and the final table and "
                               "plot stop at the last one written", split, iteration,
                               err)  # fmt: skip
                self.jsonl_off = True
        if self.cfg.console:
            keys = _CONSOLE.get(split, ())
            shown = ", ".join(
                _fmt(k, v) for k, v in metrics.items() if k in keys or k.startswith("mean/")
            )
            console(f"[{split} {iteration}] {shown}")
        numeric = {
            f"{split}/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not _empty(k, v)
        }  # a mean of nothing is left out of TensorBoard / W&B (null in the JSONL)
        if self.tb is not None:
            try:
                for k, v in numeric.items():
                    self.tb.add_scalar(k, v, iteration)
                self.tb.flush()
            except Exception as err:  # noqa: BLE001 - its writer thread's OSError (disk full)
                logger.warning("TensorBoard is off from %s %d: its event writer failed (%s: %s); "
                               "the run goes on", split, iteration, type(err).__name__,
                               err)  # fmt: skip
                self._close_tb()
        if self.wandb is not None:
            try:
                self.wandb.log(numeric, step=iteration)
            except Exception as err:  # noqa: BLE001 - a lost connection must not end training
                logger.warning("W&B is off from iteration %d: wandb.log failed (%s: %s); "
                               "metrics still go to %s", iteration, type(err).__name__, err,
                               self.path)  # fmt: skip
                self.wandb = None

    def _close_tb(self) -> None:
        tb, self.tb = self.tb, None
        try:
            tb.close()
        except Exception:  # noqa: BLE001 - the writer already failed; nothing more to lose
            pass

    def close(self) -> None:
        if self.tb is not None:
            self._close_tb()
        if self.wandb is not None:
            self.wandb.finish()


def _quiet_writer_thread() -> None:
    """TensorBoard's event writer thread dies of a full disk with a traceback on stderr (its
    next add_scalar then raises, and :meth:`MetricsLogger.log` turns TensorBoard off): print one
    line for it instead. Other threads' exceptions reach the hook that was in place."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "eaopd_quiet", False):
        return

    def hook(args):
        thread_module = type(args.thread).__module__ if args.thread is not None else ""
        if thread_module.startswith("tensorboard") and issubclass(args.exc_type, OSError):
            logger.warning("TensorBoard's event writer stopped: %s", args.exc_value)
            return
        previous(args)

    hook.eaopd_quiet = True
    threading.excepthook = hook


def _append_line(path: str, line: str) -> None:
    """Append ``line`` with one unbuffered write; a write that fails (ENOSPC) or stops short is
    cut back off, so the file never ends in half a record that its readers would choke on."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write (the disk is full?)", path)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


_CONSOLE = {
    "train": (
        "loss", "pg_loss", "fkl", "gate", "teacher_entropy", "student_entropy", "reward",
        "response_length", "grad_norm", "tokens_per_s", "time_iteration", "memory_rollout_gib",
        "memory_update_gib",
    ),
    "eval": (
        "student_high_frac", "teacher_high_frac", "fkl_high",
        "response_length", "time_eval",
    ),
    "teacher": ("response_length",),
}  # fmt: skip


#: Metrics that are means over a subset that can be empty (NaN then, not a failure): shown as
#: n/a and left out of TensorBoard / W&B. Any other NaN (a loss) stays visible everywhere.
_MAY_BE_EMPTY = frozenset({"fkl_high"})


def _empty(key: str, value) -> bool:
    return key in _MAY_BE_EMPTY and isinstance(value, float) and math.isnan(value)


def _fmt(key: str, value) -> str:
    if _empty(key, value):
        return f"{key}=n/a"  # fkl_high with no high-entropy teacher token
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"


def wandb_warning(cfg) -> str | None:
    """Why ``logging.wandb`` will likely not log (checked at the start, before the models load,
    since wandb.init only runs after them): wandb not installed, or no credentials
    (WANDB_API_KEY, a netrc entry for api.wandb.ai or WANDB_BASE_URL's host) outside offline or
    disabled mode. None when nothing is in the way (the network is not tried)."""
    if not cfg.logging.wandb:
        return None
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return "logging.wandb is on but wandb is not installed (pip install wandb): no W&B run"
    if (
        os.environ.get("WANDB_API_KEY")
        or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1")
    ):
        return None
    import netrc
    from urllib.parse import urlparse

    # `wandb login` keeps the key under the server's host (a self-hosted one: WANDB_BASE_URL)
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        found = None
    if found:
        return None
    return (
        "logging.wandb is on but no W&B credentials were found (WANDB_API_KEY, or `wandb login`"
        "'s ~/.netrc entry): wandb.init will fail after the models load and the run goes on "
        "without W&B (metrics.jsonl has everything). Set WANDB_API_KEY, or WANDB_MODE=offline "
        "on nodes without network"
    )
