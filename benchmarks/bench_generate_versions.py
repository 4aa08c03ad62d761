"""Whole ``generate`` calls of this checkout against another checkout of the project (an A/B
across versions: is a change a regression, or is it the machine?).

Each measurement is a fresh process (one torch thread) that imports ``megatron_eaopd`` from one
checkout, builds ``bench_rollout.py``'s model (4 x 256 Qwen3-shaped, vocabulary 4096; the same
weights in both), and times 6 uniform calls (batch 32, 16-token prompts, 128 new tokens, EOS
off); the best of the last 5 in process CPU time. Processes alternate between the checkouts
``--pairs`` times, so that the machine's drift hits both; printed: every pair, the medians and
the best, and whether both gave the same tokens.

    git worktree add /tmp/old 04aea9a
    python benchmarks/bench_generate_versions.py --other /tmp/old --pairs 11
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import os, socket, sys, time, torch, torch.distributed as dist
torch.set_num_threads(1)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
import megatron_eaopd
from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant
from megatron_eaopd.parallel.init import initialize_parallel
from megatron_eaopd.rollout import SamplingParams, generate
assert megatron_eaopd.__file__.startswith(sys.argv[1]), megatron_eaopd.__file__
initialize_parallel(1, 1, seed=1)
cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                  kv_channels=64, ffn_hidden_size=768, vocab_size=4096, qk_layernorm=True,
                  max_sequence_length=144, make_vocab_size_divisible_by=8,
                  untie_embeddings_and_output_weights=True, rotary_base=1000000.0)
(model,) = build_model(cfg)
init_weights_layout_invariant([model], 0)
gen = torch.Generator().manual_seed(0)
prompts = [[1] + torch.randint(3, 4096, (15,), generator=gen).tolist() for _ in range(32)]
times = []
for _ in range(6):
    t0 = time.process_time()
    out = generate(model, prompts, max_new_tokens=128, eos_id=-1, pad_id=0, vocab_size=4096,
                   params=SamplingParams(), generator=torch.Generator().manual_seed(1))
    times.append(time.process_time() - t0)
print(min(times[1:]), int(out.tokens.sum()))
"""


def _measure(root: str) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _CHILD, root], env=env, cwd=root,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"the run from {root} failed:\n{proc.stderr[-2000:]}")
    seconds, checksum = proc.stdout.split()[-2:]
    return float(seconds), int(checksum)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--other", required=True, help="another checkout of the project (its root)")
    p.add_argument("--pairs", type=int, default=11)
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = os.path.abspath(args.other)
    if not os.path.isdir(os.path.join(other, "megatron_eaopd")):
        p.error(f"--other {other} holds no megatron_eaopd package")
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    rows = {"other": [], "this": []}
    sums = set()
    print("| pair | other (s) | this (s) |\n|---|---|---|")
    for i in range(args.pairs):
        (a, sa), (b, sb) = _measure(other), _measure(here)
        rows["other"].append(a)
        rows["this"].append(b)
        sums |= {sa, sb}
        print(f"| {i + 1} | {a:.3f} | {b:.3f} |", flush=True)
    for name, ts in rows.items():
        print(f"{name}: median {statistics.median(ts):.3f} s, best {min(ts):.3f} s CPU")
    print(f"same tokens: {len(sums) == 1}")


if __name__ == "__main__":
    main()
