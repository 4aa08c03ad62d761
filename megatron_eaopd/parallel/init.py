"""Start torch.distributed and megatron-core's parallel state for a TP x PP (x VPP) layout.

`initialize_parallel(tp, pp, vpp)` is the one call a program makes before building models: it
enables the CPU compatibility layer when there is no CUDA device, starts torch.distributed from the
environment (env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as set by torchrun or srun) unless
it is already running, checks the layout against the world size, then creates megatron's TP, PP and
DP groups and seeds its RNG tracker. Bad layouts fail here, before any model is built, with a
ValueError that names the fix.

Several layouts in one job (a teacher at TP=2 PP=2 beside a student at TP=2 PP=1 on the same 4
ranks): `initialize_layouts({"student": (2, 1, None), "teacher": (2, 2, None)})` creates the groups
of each once and `use_layout("teacher")` swaps megatron's parallel state to that layout for a
block. Models keep the groups they were built with; build each model, and run its schedule and
checkpoint I/O, inside its own layout.

Megatron's rank order is tp-cp-ep-dp-pp: TP ranks are adjacent (rank = tp_rank + tp * (dp_rank +
dp * pp_rank)), which keeps TP traffic inside a node.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel layout of this job, and where this process sits in it.

    Attributes:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        vpp: virtual pipeline (model chunks per pipeline rank), None when not interleaved.
        dp: data-parallel size (world_size / (tp * pp)).
        world_size: number of processes.
        rank: global rank of this process.
        tp_rank: rank in the tensor-parallel group.
        pp_rank: pipeline stage of this process.
        dp_rank: rank in the data-parallel group.
    """

    tp: int
    pp: int
    vpp: int | None
    dp: int
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_parallel_layout(world_size: int, tp: int, pp: int, vpp: int | None = None) -> int:
    """Check that TP x PP (x VPP) fits `world_size`; return the data-parallel size.

    Raises ValueError naming the fix when world_size is not a multiple of tp * pp, or when virtual
    pipeline parallelism is asked for without pipeline parallelism. No communication.
    """
    _positive_int("world_size", world_size)
    _positive_int("tensor_model_parallel_size (tp)", tp)
    _positive_int("pipeline_model_parallel_size (pp)", pp)
    if vpp is not None:
        _positive_int("virtual_pipeline_model_parallel_size (vpp)", vpp)
        if pp == 1 and vpp > 1:
            raise ValueError(
                f"virtual pipeline size vpp={vpp} needs pipeline parallelism, but pp=1. "
                f"Set pp >= 2 or drop vpp (vpp=None)."
            )
    if world_size % (tp * pp) != 0:
        multiples = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"world size {world_size} is not a multiple of tp x pp = {tp} x {pp} = {tp * pp}. "
            f"Choose tp * pp among the divisors of the world size {multiples}, or launch a "
            f"multiple of {tp * pp} processes (nodes x GPUs per node)."
        )
    return world_size // (tp * pp)


def compute_device() -> torch.device:
    """The device tensors of this process live on: its current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank0_says(value: bool) -> bool:
    """Rank 0's ``value`` on every rank, e.g. whether rank 0 sees a file (one broadcast of one
    int over WORLD; none with one process)."""
    flag = torch.tensor([int(bool(value))], device=compute_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def rank0_object(value):
    """Rank 0's ``value`` (any picklable object) on every rank: one ``broadcast_object_list``
    over WORLD; none with one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def default_backend() -> str:
    """'nccl' when CUDA is available, else 'gloo'."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def uses_nccl() -> bool:
    """Whether the running default process group sends CUDA tensors over NCCL: backend nccl, or
    none given (torch's "undefined": gloo for CPU tensors, nccl for CUDA ones)."""
    config = getattr(dist, "get_backend_config", None)
    return "nccl" in str(config() if config else dist.get_backend())


def device_problem(local_rank: str | None, current: int, count: int) -> str | None:
    """Why a process of a running NCCL job may sit on the wrong GPU: LOCAL_RANK (the launcher's,
    a string; None: not set) names GPU ``LOCAL_RANK % count`` of the ``count`` visible, and the
    current one is ``current``; LOCAL_RANK >= count shares a GPU with a lower rank. None when it
    matches, with no LOCAL_RANK, or with one GPU visible (one GPU bound per process)."""
    if local_rank is None or count <= 1 or not local_rank.strip().isdigit():
        return None
    want = int(local_rank) % count
    if current == want and int(local_rank) < count:
        return None
    return (
        f"torch.distributed runs on NCCL and this process (LOCAL_RANK {local_rank}) uses GPU "
        f"{current} of the {count} visible"
        + (f", not GPU {want}" if current != want else ", which a lower local rank uses too")
        + ": if processes of a node share a GPU, NCCL fails with 'Duplicate GPU detected' or "
        "memory runs out. Call torch.cuda.set_device(int(os.environ['LOCAL_RANK']) % "
        "torch.cuda.device_count()) before torch.distributed.init_process_group, with at most "
        "one process per GPU (fine as it is where the launcher binds several GPUs to each "
        "process)"
    )


def initialize_distributed(
    backend: str | None = None,
    init_method: str | None = None,
    timeout_minutes: int = 30,
) -> tuple[int, int]:
    """Start torch.distributed unless it is already running; return (rank, world_size).

    `init_method=None` means env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher);
    a single process with none of them set gets a local one-rank group on a free port. With CUDA,
    each process selects GPU LOCAL_RANK. Collectives: the rendezvous of init_process_group only.
    Already running (your own Megatron job, the plugin): an NCCL process whose current GPU is not
    LOCAL_RANK's gets a warning naming ``torch.cuda.set_device`` (a warning: a launcher that
    binds several GPUs per process makes another index right).
    """
    if dist.is_initialized():
        if torch.cuda.is_available() and uses_nccl():
            problem = device_problem(os.environ.get("LOCAL_RANK"), torch.cuda.current_device(),
                                     torch.cuda.device_count())  # fmt: skip
            if problem:
                logger.warning("%s", problem)
        return dist.get_rank(), dist.get_world_size()
    backend = backend or default_backend()
    if init_method is None and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_method = f"tcp://127.0.0.1:{port}"
        rank, world_size = 0, 1
    else:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if init_method is None and missing and world_size > 1:
            raise ValueError(
                f"torch.distributed env:// initialisation needs {missing} in the environment. "
                f"Launch with torchrun (or srun setting MASTER_ADDR/MASTER_PORT), or pass "
                f"init_method='tcp://HOST:PORT'."
            )
        init_method = init_method or "env://"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return dist.get_rank(), dist.get_world_size()


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    *,
    seed: int = 1234,
    backend: str | None = None,
    init_method: str | None = None,
    timeout_minutes: int = 30,
    models: Mapping | None = None,
) -> ParallelLayout:
    """Start torch.distributed and megatron's parallel state for TP x PP (x VPP); seed the RNGs.

    `models` ({name: ModelConfig}) are checked against the layout first, before anything starts
    (ValueError naming the fix: heads or query groups not divisible by tp, layers by pp x vpp).

    Enables the CPU compatibility layer first when CUDA is absent. If megatron's parallel state is
    already initialised (another layout), it is destroyed and rebuilt. Seeds megatron's RNG tracker
    with `seed` (model-parallel regions get seed + 2718 + tp_rank, as in megatron).

    Collectives: init_process_group's rendezvous (if not yet started) and the new_group calls of
    megatron's initialize_model_parallel (every rank must call this with the same arguments).
    """
    from megatron_eaopd.compat.cpu import enable_cpu_compat

    _positive_int("tensor_model_parallel_size (tp)", tp)
    _positive_int("pipeline_model_parallel_size (pp)", pp)
    for name, cfg in (models or {}).items():
        cfg.check_layout(tp, pp, vpp, name=name)
    enable_cpu_compat()
    # Check what needs no communication before starting anything.
    if dist.is_initialized():
        check_parallel_layout(dist.get_world_size(), tp, pp, vpp)
    rank, world_size = initialize_distributed(backend, init_method, timeout_minutes)
    dp = check_parallel_layout(world_size, tp, pp, vpp)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        if _LAYOUTS:  # groups of registered layouts stay usable: forget them, do not destroy
            _forget_model_parallel()
        else:
            parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    layout = current_layout()
    logger.info("parallel layout: tp=%d pp=%d vpp=%s dp=%d (world %d)", tp, pp, vpp, dp, world_size)
    return layout


def _forget_model_parallel() -> None:
    """Reset megatron's parallel-state globals like ``destroy_model_parallel`` but without
    destroying any process group (megatron destroys its gloo groups there), so layouts registered
    with :func:`use_layout` keep working groups."""
    from megatron.core import parallel_state

    original = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group = original


def current_layout() -> ParallelLayout:
    """The layout megatron's parallel state holds now. No communication."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel state is not initialised: call "
            "megatron_eaopd.parallel.init.initialize_parallel(tp, pp) first."
        )
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    return ParallelLayout(
        tp=tp,
        pp=pp,
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Tear down megatron's parallel state (and torch.distributed when asked)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


# Several layouts on the same ranks: megatron's parallel state is a set of module globals; each
# registered layout keeps its own copy of them and use_layout() swaps them in.
_STATE_NAME = re.compile(r"_[A-Z][A-Z0-9_]*")
_LAYOUTS: dict[str, tuple[ParallelLayout, dict]] = {}
_ACTIVE: list[str | None] = [None]


def _capture_state() -> dict:
    from megatron.core import parallel_state as ps

    state = {}
    for name, value in vars(ps).items():
        if not _STATE_NAME.fullmatch(name) or isinstance(value, (types.ModuleType, type)):
            continue
        if callable(value) and not hasattr(value, "rank"):
            continue
        state[name] = dict(value) if isinstance(value, dict) else value
    return state


def _restore_state(state: dict) -> None:
    from megatron.core import parallel_state as ps

    for name, value in state.items():
        setattr(ps, name, dict(value) if isinstance(value, dict) else value)


def initialize_layouts(
    layouts: Mapping[str, tuple[int, int, int | None]],
    *,
    seed: int = 1234,
    backend: str | None = None,
    init_method: str | None = None,
    timeout_minutes: int = 30,
    models: Mapping | None = None,
) -> dict[str, ParallelLayout]:
    """Create megatron's groups for several named (tp, pp, vpp) layouts on the same ranks.

    Every layout must fit the world size, and `models` ({layout name: ModelConfig}) their layouts
    (ValueError naming the fix otherwise, before any group is created). The first layout is
    active on return. Collectives: the new_group calls of one
    initialize_model_parallel per layout (every rank calls this with the same arguments).
    """
    if not layouts:
        raise ValueError("initialize_layouts needs at least one layout")
    for name, cfg in (models or {}).items():
        if name not in layouts:
            raise ValueError(f"model {name!r} has no layout; layouts: {sorted(layouts)}")
        cfg.check_layout(*layouts[name], name=name)
    rank, world_size = initialize_distributed(backend, init_method, timeout_minutes)
    for name, (tp, pp, vpp) in layouts.items():
        try:
            check_parallel_layout(world_size, tp, pp, vpp)
        except ValueError as exc:
            raise ValueError(f"layout {name!r}: {exc}") from None
    _LAYOUTS.clear()
    from megatron_eaopd.parallel.exchange import _TABLES

    _TABLES.clear()  # rank tables of earlier layouts
    for name, (tp, pp, vpp) in layouts.items():
        layout = initialize_parallel(tp, pp, vpp, seed=seed, timeout_minutes=timeout_minutes)
        _LAYOUTS[name] = (layout, _capture_state())
    first = next(iter(layouts))
    activate_layout(first)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return {name: layout for name, (layout, _) in _LAYOUTS.items()}


def activate_layout(name: str) -> ParallelLayout:
    """Make the registered layout `name` megatron's current parallel state. No communication."""
    if name not in _LAYOUTS:
        raise KeyError(
            f"no layout {name!r}; registered: {sorted(_LAYOUTS)} (see initialize_layouts)"
        )
    layout, state = _LAYOUTS[name]
    _restore_state(state)
    _ACTIVE[0] = name
    return layout


def registered_layout(name: str) -> ParallelLayout:
    """This rank's ParallelLayout of the registered layout ``name`` (not activated)."""
    if name not in _LAYOUTS:
        raise KeyError(f"no layout {name!r}; registered: {sorted(_LAYOUTS)}")
    return _LAYOUTS[name][0]


def active_layout_name() -> str | None:
    """Name of the active registered layout (None when initialize_layouts was not used)."""
    return _ACTIVE[0]


@contextlib.contextmanager
def use_layout(name: str):
    """Run a block under the registered layout `name`, then restore the previous parallel state.

    Yields the ParallelLayout. No communication.
    """
    previous, previous_name = _capture_state(), _ACTIVE[0]
    try:
        yield activate_layout(name)
    finally:
        _restore_state(previous)
        _ACTIVE[0] = previous_name


def register_current_layout(name: str) -> ParallelLayout:
    """Register megatron's current parallel state (made by the caller, e.g. Megatron-LM's
    ``initialize_megatron``) as the layout ``name``, so :func:`use_layout` can come back to it.
    No communication."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron's parallel state is not initialised: call "
            "megatron.core.parallel_state.initialize_model_parallel first"
        )
    layout = current_layout()
    _LAYOUTS[name] = (layout, _capture_state())
    _ACTIVE[0] = name
    return layout


def world_timeout_minutes(default: int = 30) -> int:
    """The default process group's timeout in whole minutes (at least 1), ``default`` when it
    cannot be read (another backend) or torch.distributed is not running. No communication."""
    if not dist.is_initialized():
        return default
    try:
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        timeout = dist.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return default
    return max(1, math.ceil(timeout.total_seconds() / 60))


def add_layout(
    name: str, tp: int, pp: int, vpp: int | None = None, *, seed: int = 1234,
    timeout_minutes: int | None = None,
) -> ParallelLayout:  # fmt: skip
    """Create the groups of another (tp, pp, vpp) layout on the same ranks and register it as
    ``name``, leaving the caller's current parallel state, megatron's RNG tracker and torch's RNG
    as they were (the current state must be registered first: :func:`register_current_layout`).
    ``timeout_minutes`` of the new groups; None: the default process group's (the user's
    ``--distributed-timeout-minutes`` under Megatron-LM), :func:`world_timeout_minutes`.

    Every rank must call it with the same arguments. Collectives: the new_group calls of one
    ``initialize_model_parallel``.
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel import random as megatron_random

    if _ACTIVE[0] is None or _ACTIVE[0] not in _LAYOUTS:
        raise RuntimeError("register the current layout first (register_current_layout)")
    previous, previous_name = _capture_state(), _ACTIVE[0]
    tracker = get_cuda_rng_tracker()
    tracker_states = tracker.get_states()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    from megatron_eaopd.parallel.exchange import _TABLES

    _TABLES.clear()
    try:
        minutes = world_timeout_minutes() if timeout_minutes is None else timeout_minutes
        layout = initialize_parallel(tp, pp, vpp, seed=seed, timeout_minutes=minutes)
        _LAYOUTS[name] = (layout, _capture_state())
    finally:
        _restore_state(previous)
        _ACTIVE[0] = previous_name
        megatron_random._CUDA_RNG_STATE_TRACKER = tracker  # seeding made a new tracker object
        tracker.set_states(tracker_states)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
    return layout
