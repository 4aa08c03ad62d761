"""Helper processes die with their rank: a rank killed with SIGKILL leaves no process behind.

A real save (``models.checkpoint.save_checkpoint`` -> megatron's dist_checkpointing, which starts a
spawned multiprocessing manager on the first save and keeps it) plus forked, spawned and
fork-server helpers started after it, some from a thread that has already exited
(tests/launch/orphan_saver.py).
Without ``signals.install_orphan_guard`` the manager (and the resource tracker it holds open)
outlive a SIGKILLed rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkilled_rank_leaves_no_helper_alive(tmp_path):
    rank = subprocess.Popen(
        [sys.executable, "-m", "tests.launch.orphan_saver", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    descendants: list[psutil.Process] = []
    try:
        started = []
        deadline = time.monotonic() + 240
        for line in rank.stdout:
            if line.startswith("HELPERS"):
                started = [int(x) for x in line.split()[1:]]
            if line.startswith("READY") or time.monotonic() > deadline:
                break
        assert rank.poll() is None, "the rank stand-in died before it was ready"
        assert len(started) == 4
        time.sleep(1.0)  # helpers started from the exited thread must still be alive
        descendants = psutil.Process(rank.pid).children(recursive=True)
        pids = {p.pid for p in descendants}
        assert set(started) <= pids
        alive_pids = {p.pid for p in _alive(descendants)}
        assert set(started) <= alive_pids, "a helper died while its rank was alive"
        spawned = [p for p in descendants if "spawn_main" in " ".join(p.cmdline())]
        assert len(spawned) >= 2, "expected dist_checkpointing's manager and a spawned helper"

        os.kill(rank.pid, signal.SIGKILL)
        rank.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [(p.pid, " ".join(p.cmdline())[:80]) for p in _alive(descendants)]
        assert not left, f"processes outlived their SIGKILLed rank: {left}"
    finally:
        if rank.poll() is None:
            rank.kill()
            rank.wait()
        for p in _alive(descendants):  # only what this test started
            p.kill()
