"""The peak-memory metrics' measurement (trainer/peak_memory.py): a reset starts a new peak, an
allocation raises it by its size, and the value logged is the maximum over ranks."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_eaopd.trainer.peak_memory import max_over_ranks, peak_gib, reset_peak
from tests.dist import run_distributed


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _resettable(), reason="/proc/self/clear_refs is not writable here")
def test_a_reset_starts_a_new_peak_and_an_allocation_raises_it():
    reset_peak()
    base = peak_gib()
    assert abs(base - _status_kib("VmHWM") / 2**20) < 0.05  # the kernel's own peak
    big = torch.ones(64 * 2**20)  # 256 MiB, written
    high = peak_gib()
    assert high >= base + 0.24
    del big
    assert peak_gib() >= high - 0.01  # a peak, not the current size (kernel counters: ~MiB)
    reset_peak()
    assert peak_gib() <= high - 0.2  # back near the current resident size
    assert abs(peak_gib() - _status_kib("VmRSS") / 2**20) < 0.05


def test_without_a_reset_the_peak_counts_from_the_start_and_a_warning_says_so(caplog):
    from unittest import mock

    from megatron_eaopd.trainer import peak_memory

    real_open = open

    def refuse(path, *args, **kwargs):
        if path == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    with mock.patch("builtins.open", refuse), mock.patch.object(peak_memory, "_WARNED", []):
        with caplog.at_level("WARNING", logger=peak_memory.__name__):
            reset_peak()
            reset_peak()
        assert peak_gib() == pytest.approx(_status_kib("VmHWM") / 2**20, abs=0.05)
    warnings = [r for r in caplog.records if "clear_refs" in r.getMessage()]
    assert len(warnings) == 1 and "since the process started" in warnings[0].getMessage()


def _max_worker(rank, world):
    return max_over_ranks([float(rank), math.nan if rank == 1 else 2.0 + rank, -1.0 * rank])


def test_max_over_ranks_is_the_same_everywhere_and_keeps_a_nan():
    for got in run_distributed(_max_worker, 3):
        assert got[0] == 2.0 and math.isnan(got[1]) and got[2] == 0.0
