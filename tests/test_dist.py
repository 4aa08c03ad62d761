"""The distributed test harness (tests/dist.py): workers forked from the preloading server see
the launching process's current environment, and a launch that changes a start-up variable is
spawned so that the variable acts."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.dist import _start_method, run_distributed

if "RANK" not in os.environ:  # pytest's process, while the tests are collected: so before the
    os.environ.setdefault("EAOPD_DIST_STALE", "server")  # fork server starts (first launch)
# in a worker: what its environment held when this module was imported there
AT_IMPORT = os.environ.get("EAOPD_DIST_PROBE")


def _env_worker(rank, world_size, names):
    with open("/proc/self/environ", "rb") as f:  # what the process was started with
        initial = dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)
    return {
        "now": {name: os.environ.get(name) for name in names},
        "initial": {name: initial.get(name) for name in names},
        "parent": os.getppid(),
        "megatron_preloaded": "megatron.core" in __import__("sys").modules,
        "rank": os.environ["RANK"],
        "at_import": AT_IMPORT,
        "seed": torch.initial_seed(),
    }


def test_workers_see_the_launchers_current_environment(monkeypatch):
    names = ["EAOPD_DIST_PROBE", "EAOPD_DIST_STALE"]
    monkeypatch.setenv("EAOPD_DIST_PROBE", "first")
    first = run_distributed(_env_worker, 2, names)
    monkeypatch.delenv("EAOPD_DIST_PROBE")
    monkeypatch.delenv("EAOPD_DIST_STALE")  # in the server's environment, not in ours
    second = run_distributed(_env_worker, 2, names)
    assert [r["now"]["EAOPD_DIST_PROBE"] for r in first] == ["first", "first"]
    assert [r["now"] for r in second] == [dict.fromkeys(names)] * 2
    assert [r["rank"] for r in first] == ["0", "1"]
    assert [r["at_import"] for r in first] == ["first", "first"]  # imported under it
    # random states reseeded: not the server's, so different in every worker and launch
    assert len({r["seed"] for r in first + second}) == 4
    # forked from the server (not children of this process), torch and megatron-core imported
    assert all(r["parent"] != os.getpid() and r["megatron_preloaded"] for r in first + second)


def test_a_start_up_variable_gets_spawned_workers(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")  # glibc reads it only when a process starts
    results = run_distributed(_env_worker, 2, ["MALLOC_ARENA_MAX"])
    assert all(r["initial"]["MALLOC_ARENA_MAX"] == "3" for r in results)
    assert all(r["parent"] == os.getpid() for r in results)  # spawned by this process
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    results = run_distributed(_env_worker, 1, ["MALLOC_ARENA_MAX"], env={"MALLOC_ARENA_MAX": "4"})
    assert results[0]["initial"]["MALLOC_ARENA_MAX"] == "4"  # given as env=: in force at start
    assert "MALLOC_ARENA_MAX" not in os.environ


def _killed_worker(rank, world_size):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


def test_a_killed_rank_is_reported_with_its_exit():
    with pytest.raises(AssertionError, match=r"rank 1: exited without a result, exit code -9"):
        run_distributed(_killed_worker, 2, timeout=60)


def test_start_method_choice():
    env = dict(os.environ)
    # fails when an earlier test or library changed a start-up variable in this process: every
    # later launch would be spawned (~8 s of imports per worker)
    assert _start_method(env, "gloo") == "forkserver"
    inductor = {"TORCHINDUCTOR_CACHE_DIR": "/tmp/x", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR": "1"}
    assert _start_method({**env, **inductor}, "gloo") == "forkserver"  # set by torch.compile
    assert _start_method(env, "nccl") == "spawn"  # CUDA may be initialised in the server
    assert _start_method({**env, "PYTORCH_JIT": "0"}, "gloo") == "spawn"
    assert _start_method({**env, "EAOPD_ANYTHING": "1"}, "gloo") == "forkserver"
