"""benchmarks/bench_decode_gemms.py runs and its variants agree: the three ways of running a
decode step's GEMMs give F.linear's values, and the hand-written attention SDPA's (timing loops
cut to one call; the timings themselves are the script's output, not asserted)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_decode_gemms as B  # noqa: E402


def _once(fn, n):
    t = time.perf_counter()
    fn()
    return max(time.perf_counter() - t, 1e-9)


def test_gemm_ways_and_attention_agree(capsys):
    with mock.patch.object(B, "_best", _once):
        B.gemms()
        B.step()
        B.attention()
    out = capsys.readouterr().out
    assert "16.8 MB of fp32 weights" in out
    ways = [line for line in out.splitlines() if line.startswith("| F.linear")
            or line.startswith("| matmul") or line.startswith("| MKL")]  # fmt: skip
    assert len(ways) >= 2 and all(line.rstrip().endswith("| True |") for line in ways), ways
    diffs = [float(m) for m in re.findall(r"\| (\d\.\de[-+]\d+) \|", out)]
    assert len(diffs) == 3 and max(diffs) < 1e-5
