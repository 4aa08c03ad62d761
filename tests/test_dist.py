"""The distributed test harness (tests/dist.py): workers forked from the preloading server see
the launching process's current environment, and a launch that changes a start-up variable is
spawned so that the variable acts."""

from __future__ import annotations

import os

from tests.dist import run_distributed

# set while the tests are collected, so before the fork server starts (at the first launch)
os.environ.setdefault("EAOPD_DIST_STALE", "server")


def _env_worker(rank, world_size, names):
    with open("/proc/self/environ", "rb") as f:  # what the process was started with
        initial = dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)
    return {
        "now": {name: os.environ.get(name) for name in names},
        "initial": {name: initial.get(name) for name in names},
        "parent": os.getppid(),
        "megatron_preloaded": "megatron.core" in __import__("sys").modules,
        "rank": os.environ["RANK"],
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
    # forked from the server (not children of this process), torch and megatron-core imported
    assert all(r["parent"] != os.getpid() and r["megatron_preloaded"] for r in first + second)


def test_a_start_up_variable_gets_spawned_workers(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")  # glibc reads it only when a process starts
    results = run_distributed(_env_worker, 2, ["MALLOC_ARENA_MAX"])
    assert all(r["initial"]["MALLOC_ARENA_MAX"] == "3" for r in results)
    assert all(r["parent"] == os.getpid() for r in results)  # spawned by this process
