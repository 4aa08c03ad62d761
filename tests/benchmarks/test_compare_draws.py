"""benchmarks/compare_draws.py tells a checkout whose draws differ from one whose draws do not:
against a copy of this checkout with the blocked draw's inner salt changed, the blocked-draw
settings differ (exit status 1) and the others (one Gumbel per column, top-k, top-p) agree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compare_draws_finds_a_changed_stream_and_only_it(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ROOT / "megatron_eaopd", other / "megatron_eaopd",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    sampling = other / "megatron_eaopd" / "rollout" / "sampling.py"
    text = sampling.read_text()
    assert "_INNER_SALT = 0x5BD1E995" in text
    sampling.write_text(text.replace("_INNER_SALT = 0x5BD1E995", "_INNER_SALT = 0x5BD1E996"))
    proc = subprocess.run(
        [sys.executable, "benchmarks/compare_draws.py", "--other", str(other), "--tp", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 10
    for line in rows:
        blocked = line.startswith("| 1 | V 4096") and "top_" not in line
        assert ("DIFFER" in line) == blocked, line
    assert "5 of 10 settings differ" in proc.stdout
