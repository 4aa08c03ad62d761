"""Run a function in several processes (CPU over gloo): the distributed test harness.

Workers run where ``compute_device()`` points: the CPU here (gloo); a GPU test passes
``backend="nccl"`` (one GPU: world size 1). Each worker gets (rank, world_size, *args), runs with
one torch thread, and may return a picklable value; `run_distributed` returns the list of values
by rank and re-raises the first failure with the worker's traceback. Every launch has a deadline:
a hung collective fails the test instead of hanging CI.

Workers start from a fork server that has imported torch and megatron-core once (``PRELOAD``):
importing them costs ~8 s of CPU per process, which spawned workers paid at every launch (about
half of the default test run's CPU time). As in a spawned process, a worker gets the caller's
current environment (``os.environ`` at the launch) before it imports anything else: the test
function and its arguments travel pickled and are loaded after the environment is set, so the
test's modules (ours included) import fresh under it. What differs from a spawned process:

- variables read when a process starts or when the preloaded modules import (``_STARTUP_ENV``:
  the allocator's, OpenMP's and BLAS's thread settings, the loader's, torch's, numpy's, CUDA's
  and Transformer Engine's) cannot be handed to a forked process: a launch whose environment
  differs in one of them from the one this module was imported with (the fork server's) is
  spawned instead, and so is every NCCL launch (a GPU library imported by the server may have
  initialised CUDA, which a forked process cannot use);
- torch's and numpy's global random states are reseeded from the OS in each worker (a fork
  would copy the server's); Python's hash seed is the server's, the same in every worker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import tempfile
import traceback
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# imported once by the fork server (third-party only: our modules import in each worker, after
# its environment is set)
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state"]
# read when a process starts or when the preloaded modules import
# (not TORCHINDUCTOR_*: inductor sets its cache directory in the launching process when it
# compiles there, which would send every later launch down the slow path)
_STARTUP_ENV = ("MALLOC_", "GLIBC_TUNABLES", "LD_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_",
                "PYTHON", "PYTORCH_", "TORCH_", "NPY_", "NUMPY_", "CUDA_", "NVTE_")  # fmt: skip
# the server starts at the first forkserver launch, which needs these as they are now
_SERVER_ENV = {k: v for k, v in os.environ.items() if k.startswith(_STARTUP_ENV)}
mp.set_forkserver_preload(PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, init_file, out_dir, call, env, backend):
    os.environ.clear()  # the launching process's environment (a forked worker has the server's)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    tempfile.tempdir = None  # re-read TMPDIR
    torch.seed()  # a forked worker holds the server's random states
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        fn, args = pickle.loads(call)  # imports the test's modules, under this environment
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        value = fn(rank, world_size, *args)
        payload = ("ok", value)
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        payload = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        data = pickle.dumps(payload)
    except Exception as exc:  # noqa: BLE001 - an unpicklable return value
        data = pickle.dumps(("error", f"rank {rank}: result not picklable: {exc!r}"))
    with open(result_path + ".part", "wb") as f:  # a rank killed mid-write leaves no result
        f.write(data)
    os.replace(result_path + ".part", result_path)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    if payload[0] == "error":
        os._exit(1)


def _start_method(env: dict, backend: str) -> str:
    """The start method of a launch with environment ``env``: "forkserver" (workers forked from
    a server that imported ``PRELOAD``), or "spawn" for NCCL and when ``env`` differs from the
    server's in a variable that acts only at process start or import."""
    startup = {k: v for k, v in env.items() if k.startswith(_STARTUP_ENV)}
    return "forkserver" if startup == _SERVER_ENV and backend != "nccl" else "spawn"


def run_distributed(
    fn, world_size: int, *args, timeout: float = 240.0, env: dict | None = None,
    backend: str = "gloo",
):  # fmt: skip
    """Run fn(rank, world_size, *args) on `world_size` processes (``backend``: gloo, or nccl on
    GPUs); return results by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               **(env or {})}  # fmt: skip
        method = _start_method(env, backend)
        # a spawned process starts with this process's environment: ``env`` while it starts
        with mock.patch.dict(os.environ, env) if method == "spawn" else contextlib.nullcontext():
            ctx = mp.start_processes(
                _worker,
                args=(world_size, init_file, tmp, pickle.dumps((fn, args)), env, backend),
                nprocs=world_size,
                join=False,
                start_method=method,
            )
        import time

        deadline = time.monotonic() + timeout
        exited = ""
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test timed out after {timeout:.0f}s")
        except mp.ProcessRaisedException as exc:  # pragma: no cover - _worker catches
            raise AssertionError(str(exc)) from None
        except mp.ProcessExitedException as exc:  # which process died first, and how
            exited = f" (first exit: {exc})"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.pkl")
            if not os.path.exists(path):
                code = ctx.processes[rank].exitcode
                errors.append(f"rank {rank}: exited without a result, exit code {code}{exited}")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(value)
            results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results
