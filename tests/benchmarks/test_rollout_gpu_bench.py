"""The GPU rollout benchmark (benchmarks/bench_rollout_gpu.py) runs end to end at a small shape
on the CPU: the code a GPU session will run, checked here so that its device time is not spent
on a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = (
    "--device cpu --layers 2 --hidden 64 --heads 4 --groups 2 --ffn 128 --vocab 512 --batch 3 "
    "--prompt 6 --new 5"
).split()


# bf16 is the GPU run's dtype and the harder case (the first-step check's tolerance); fp32 runs
# with -m slow (13 s each on 2 cores)
@pytest.mark.parametrize("dtype", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])
def test_gpu_rollout_benchmark_runs_on_cpu_at_a_small_shape(tmp_path, dtype):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_rollout_gpu.py", *SMALL, "--dtype", dtype,
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ours", "ours, CUDA graphs", "ours, megatron forward", "transformers",
                         "megatron dynamic engine"}  # fmt: skip
    for name in ("ours", "ours, CUDA graphs", "ours, megatron forward", "transformers"):
        assert rows[name]["tokens"] == 3 * 5 and rows[name]["wall"] > 0, rows[name]
    # bf16 too: FastDecoder's first-step check accepts bf16 rounding
    assert rows["ours"]["path"] == "FastDecoder"
    assert rows["ours, megatron forward"]["path"] == "megatron"
    # 5 new tokens: the prefill, then 4 decode steps at static shapes (eager on the CPU)
    graphs = rows["ours, CUDA graphs"]
    assert graphs["path"] == "FastDecoder, no graphs: 4 steps run eagerly", graphs
    assert rows["megatron dynamic engine"]["note"].startswith("not run: ")
    assert "| ours | FastDecoder | 15 |" in proc.stdout


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--heads", "5"]])
def test_gpu_rollout_benchmark_refuses_bad_shapes(bad):
    proc = subprocess.run([sys.executable, "benchmarks/bench_rollout_gpu.py", *SMALL, *bad],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "must be" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(ROOT.glob("benchmarks/*.sh")), ids=lambda p: p.name)
def test_gpu_check_scripts_are_valid_bash(script):
    from tests.launch.test_scripts import _ensure_shellcheck

    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run([_ensure_shellcheck(), str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
