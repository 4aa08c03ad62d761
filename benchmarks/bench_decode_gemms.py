"""Where a CPU decode step's time goes: the GEMMs alone and in model order, attention, and a
profile of one ``generate`` call (the figures behind docs/trainer.md, Rollout benchmark).

One torch thread, ``bench_rollout.py``'s shape (batch 32, 4 x 256 Qwen3-shaped layers: QKV 512,
projection 256, SwiGLU 2 x 768, vocabulary 4096). Sections (``--sections``):

- ``gemms``: each of a decode step's GEMM shapes alone, repeated on one weight (which then stays
  in cache), as ``F.linear`` with the [out, in] weight; GFLOP/s.
- ``step``: the 17 GEMMs of one decode step in model order, each on its own weight (16.8 MB of
  fp32 weights in all), three ways: ``F.linear`` ([out, in]), ``matmul`` with an [in, out] copy
  (what ``FastDecoder`` uses on CPU), MKL's packed weights (``torch.ops.mkl._mkl_linear``, where
  torch has MKL); ms per step and GFLOP/s; whether the three give the same values.
- ``attention``: a decode step's attention ([32, 2 groups, 2 heads, 64] queries against the
  first L positions of a [32, 2, 144, 64] KV cache): SDPA against two ``matmul`` and a softmax.
- ``profile``: one uniform ``generate`` call (128 new tokens, 16-token prompts) under
  ``torch.profiler``: the CPU time of the top ops.

Every timing is the best of 5 rounds.

    python benchmarks/bench_decode_gemms.py
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import types

import torch
import torch.nn.functional as F

BATCH, HIDDEN, VOCAB = 32, 256, 4096
LAYER = [(256, 512), (256, 256), (256, 1536), (768, 256)]  # (in, out) of QKV, proj, fc1, fc2
STEP = LAYER * 4 + [(256, VOCAB)]


def _best(fn, n: int) -> float:
    for _ in range(max(2, n // 10)):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def gemms() -> None:
    print("\n### each GEMM alone (one weight, repeated)\n")
    print("| [M, in] x [in, out] | ms | GFLOP/s |")
    print("|---|---|---|")
    for k, n in sorted(set(STEP)):
        x, w = torch.randn(BATCH, k), torch.randn(n, k)
        t = _best(lambda x=x, w=w: F.linear(x, w), 200)
        rate = 2 * BATCH * k * n / t / 1e9
        print(f"| [{BATCH}, {k}] x [{k}, {n}] | {t * 1e3:.3f} | {rate:.0f} |")


def step() -> None:
    ws = [torch.randn(n, k) for k, n in STEP]
    xs = [torch.randn(BATCH, k) for k, _ in STEP]
    wts = [w.t().contiguous() for w in ws]
    flop = sum(2 * BATCH * k * n for k, n in STEP)
    ways = {
        "F.linear, [out, in] weights": lambda: [F.linear(x, w) for x, w in zip(xs, ws)],
        "matmul, [in, out] copies (FastDecoder on CPU)": lambda: [
            torch.matmul(x, w) for x, w in zip(xs, wts)
        ],
    }
    if torch.backends.mkl.is_available():
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, BATCH) for w in ws]
        ways["MKL packed weights"] = lambda: [
            torch.ops.mkl._mkl_linear(x, p, w, None, BATCH) for x, p, w in zip(xs, packed, ws)
        ]
    mb = sum(w.numel() for w in ws) * 4 / 1e6
    print(f"\n### the {len(STEP)} GEMMs of one decode step in model order, each on its own "
          f"weight ({mb:.1f} MB of fp32 weights)\n")  # fmt: skip
    print("| way | ms per step | GFLOP/s | same values as F.linear |")
    print("|---|---|---|---|")
    ref = ways["F.linear, [out, in] weights"]()
    for name, fn in ways.items():
        t = _best(fn, 50)
        same = all(torch.equal(a, b) for a, b in zip(fn(), ref))
        print(f"| {name} | {t * 1e3:.2f} | {flop / t / 1e9:.0f} | {same} |")


def attention() -> None:
    n, g, r, d, cache = BATCH, 2, 2, 64, 144
    k, v, q = torch.randn(n, g, cache, d), torch.randn(n, g, cache, d), torch.randn(n, g, r, d)
    scale = d**-0.5

    def sdpa(length):
        return F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], scale=scale)

    def manual(length):
        s = torch.matmul(q, k[:, :, :length].transpose(-1, -2)).mul_(scale)
        return torch.matmul(torch.softmax(s, -1), v[:, :, :length])

    print(f"\n### decode attention: [{n}, {g}, {r}, {d}] queries, the first L positions of a "
          f"[{n}, {g}, {cache}, {d}] KV cache\n")  # fmt: skip
    print("| L | SDPA us | matmul + softmax us | max difference |")
    print("|---|---|---|---|")
    for length in (17, 64, 144):
        a = _best(lambda n=length: sdpa(n), 300)
        b = _best(lambda n=length: manual(n), 300)
        diff = (sdpa(length) - manual(length)).abs().max().item()
        print(f"| {length} | {a * 1e6:.0f} | {b * 1e6:.0f} | {diff:.1e} |")


def profile(top: int) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_rollout as br

    from megatron_eaopd.rollout import SamplingParams, generate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    br._init(0, 1, port)
    args = types.SimpleNamespace(layers=4, hidden=HIDDEN, heads=4, vocab=VOCAB, prompt=16,
                                 new=128, batch=BATCH)  # fmt: skip
    model, _ = br._model(args, 1)
    prompts = br._prompts(args, VOCAB)

    def call():
        return generate(model, prompts, max_new_tokens=args.new, eos_id=-1, pad_id=0,
                        vocab_size=VOCAB, params=SamplingParams(),
                        generator=torch.Generator().manual_seed(1), compact_frac=0.25)  # fmt: skip

    for _ in range(2):
        call()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n### one uniform generate call under torch.profiler: {total / 1e6:.2f} s of CPU in "
          "ops\n")  # fmt: skip
    print("| op | calls | self CPU s | share |")
    print("|---|---|---|---|")
    for e in events[:top]:
        print(
            f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.3f} | "
            f"{e.self_cpu_time_total / total:.0%} |"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["gemms", "step", "attention", "profile"],
                        choices=["gemms", "step", "attention", "profile"])  # fmt: skip
    parser.add_argument("--top", type=int, default=6, help="ops listed by the profile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name in args.sections:
        if name == "profile":
            profile(args.top)
        else:
            globals()[name]()


if __name__ == "__main__":
    main()
