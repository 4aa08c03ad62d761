"""Run megatron-core 0.16.1 on CPU: redirect the torch.cuda calls it makes unconditionally.

megatron-core assumes CUDA in a few entry points even when nothing needs a GPU:
`device=torch.cuda.current_device()` (about 175 call sites), `device="cuda"` literals (the token
counter in pipeline schedules), `Tensor.cuda()` (tied embeddings with PP > 1),
`torch.cuda.synchronize()` (p2p, the checkpoint writer), `torch.cuda.Event` (timers), the CUDA RNG
state behind `tensor_parallel.random` (`model_parallel_cuda_manual_seed` and the RNG tracker's
`fork()`, which runs even with dropout 0) and NVTX ranges.

`enable_cpu_compat()` redirects exactly those, and nothing when `torch.cuda.is_available()`, so the
same program runs unchanged on a GPU cluster:

- `torch.cuda.current_device()` returns `torch.device("cpu")`; `synchronize()` is a no-op;
  `torch.cuda.Event` becomes a wall-clock event; NVTX ranges are no-ops.
- the CUDA RNG API (`get_rng_state`, `set_rng_state`, `manual_seed`, `manual_seed_all`, also under
  `torch.cuda.random`) and megatron's private `_set_cuda_rng_state` use the CPU default generator.
  Consequence: `model_parallel_cuda_manual_seed(seed)` reseeds the CPU RNG with `seed`, and the RNG
  tracker forks the CPU generator (dropout inside a tracked region draws from the tracked state,
  as it would on GPU).
- megatron's activation recompute (`tensor_parallel.random.CheckpointFunction`) runs the layers'
  forward again inside the backward pass, outside the function mode below (torch runs a mode's
  own call, here `torch.autograd.backward`, with the mode off): its backward enters the mode again.
- a torch function mode rewrites CUDA devices to CPU: a `device=` keyword that names CUDA (a
  "cuda..." string, a CUDA `torch.device`, or a bare int index), a CUDA device given positionally to
  `Tensor.to`, `Tensor.cuda()` (returns the tensor itself), `Tensor.pin_memory()` (returns the
  tensor itself) and `pin_memory=True`. The mode is thread-local, so it is active in the thread that
  called `enable_cpu_compat()` (and in the autograd engine, which runs CPU backward in that thread).

Megatron's sequence parallelism needs nothing here: gloo (torch 2.13) has the
`reduce_scatter_tensor` and `all_gather_into_tensor` it makes; what refuses it on CPU is the torch
norm of megatron's local spec, replaced by `models.sequence_parallel.SequenceParallelTorchNorm`.

Cost: the function mode adds a Python call per torch op, a few ms per step of a tiny model.
Everything is undone by `disable_cpu_compat()` (used by tests); `cpu_compat()` is the context
manager form.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_LOCK = threading.Lock()


class _State:
    enabled = False
    originals: list = []  # (owner, name, original value) in patch order
    mode: TorchFunctionMode | None = None


def _is_cuda_device(device) -> bool:
    """True for anything torch would read as a CUDA device: 'cuda', 'cuda:1', device('cuda'), 0."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CpuDeviceMode(TorchFunctionMode):
    """A torch function mode that sends CUDA placements to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class WallClockEvent:
    """Stand-in for `torch.cuda.Event` on CPU: records `time.perf_counter()` when recorded."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess=False):
        self.enable_timing = enable_timing
        self._t: float | None = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def elapsed_time(self, end_event: WallClockEvent) -> float:
        """Milliseconds from this event to `end_event`, like the CUDA event."""
        if self._t is None or end_event._t is None:
            raise RuntimeError("elapsed_time needs both events to be recorded first")
        return (end_event._t - self._t) * 1000.0

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


def _current_device():
    return _CPU


def _noop(*args, **kwargs):
    return None


def _get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _manual_seed(seed):
    # torch.default_generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _megatron_set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    # megatron's version queues the state through torch.cuda._lazy_call, which never runs on CPU.
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _nvtx_range(*args, **kwargs):
    yield


def _patch(owner, name, value) -> None:
    _State.originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _under_the_mode(backward):
    """``backward`` (an autograd Function's) run with the device redirect on: the autograd engine
    calls a Function's backward directly, but a backward that calls ``torch.autograd.backward``
    reaches the mode, and torch runs a mode's own call with the mode off."""

    def wrapped(ctx, *args):
        with CpuDeviceMode():
            return backward(ctx, *args)

    return staticmethod(wrapped)


def _patch_megatron() -> None:
    """Redirect megatron's private CUDA RNG setter, and run its activation recompute's backward
    (the layers' forward again, e.g. the device="cuda" causal mask of its torch softmax) under the
    device redirect, when megatron-core is installed."""
    try:
        mrandom = importlib.import_module("megatron.core.tensor_parallel.random")
    except ImportError:  # pragma: no cover - megatron-core is a declared dependency
        return
    _patch(mrandom, "_set_cuda_rng_state", _megatron_set_cuda_rng_state)
    function = mrandom.CheckpointFunction
    _State.originals.append((function, "backward", vars(function)["backward"]))
    function.backward = _under_the_mode(function.backward)


def is_cpu_compat_enabled() -> bool:
    """Whether `enable_cpu_compat()` is in effect in this process."""
    return _State.enabled


def enable_cpu_compat() -> bool:
    """Redirect megatron-core's CUDA calls to the CPU; returns True when the layer is active.

    Idempotent. A no-op returning False when CUDA is available. Call it once per process before
    building megatron models (or at least before the first megatron call that touches torch.cuda),
    in the thread that will run the model.
    """
    with _LOCK:
        if _State.enabled:
            return True
        if torch.cuda.is_available():
            return False
        cuda = torch.cuda
        _patch(cuda, "current_device", _current_device)
        _patch(cuda, "synchronize", _noop)
        _patch(cuda, "Event", WallClockEvent)
        _patch(cuda, "empty_cache", _noop)
        for owner in (cuda, cuda.random):
            _patch(owner, "get_rng_state", _get_rng_state)
            _patch(owner, "set_rng_state", _set_rng_state)
            _patch(owner, "manual_seed", _manual_seed)
            _patch(owner, "manual_seed_all", _manual_seed)
        for name in ("range_push", "range_pop", "mark"):
            _patch(cuda.nvtx, name, _noop)
        _patch(cuda.nvtx, "range", _nvtx_range)
        _patch_megatron()
        mode = CpuDeviceMode()
        mode.__enter__()
        _State.mode = mode
        _State.enabled = True
        logger.info("megatron-eaopd CPU compatibility layer enabled (no CUDA device)")
        return True


def disable_cpu_compat() -> None:
    """Undo `enable_cpu_compat()`: restore every patched attribute and leave the function mode.

    Must be called from the thread that enabled it, with no other torch function mode entered after
    it still active.
    """
    with _LOCK:
        if not _State.enabled:
            return
        if _State.mode is not None:
            _State.mode.__exit__(None, None, None)
            _State.mode = None
        for owner, name, value in reversed(_State.originals):
            setattr(owner, name, value)
        _State.originals = []
        _State.enabled = False


@contextlib.contextmanager
def cpu_compat():
    """Context manager: enable the CPU layer for the block, restore on exit if this enabled it."""
    already = _State.enabled
    active = enable_cpu_compat()
    try:
        yield active
    finally:
        if active and not already:
            disable_cpu_compat()
