"""Benchmark: the EOPD losses fused with the output layer against output layer + logits-based loss.

Per rank: `tokens` hidden states of width `hidden` for student and teacher, output-layer weight
shards of `columns` rows. Forward + backward (gradients to the student's hidden states and weight).

  unfused          logits = hidden @ weight.T for both models (teacher under no_grad), then
                   vocab_parallel_eopd_loss, backward through the matmul (plain autograd)
  fused            vocab_parallel_linear_eopd_loss (losses/fused.py): chunks of `--chunk`
                   tokens (default: 2**24 logit values), logits recomputed in backward
  fused_1pass      the same with grad_weights (here all ones, the upstream gradient of
                   loss.sum()): gradients made in the forward pass, no recompute (the trainer
                   passes the loss mask)
  unfused_sampled  teacher payload from teacher logits, then the paper's sampled objective on
                   student logits (top-k 16), backward
  fused_sampled    vocab_parallel_linear_teacher_payload + linear_sampled_objective (two passes
                   over the student: backward recomputes its chunks)
  fused_sampled_1pass  the same with grad_weights (all ones): one pass over the student, each
                   chunk's gradient made in the forward pass (fused_rows.linear_row_loss; the
                   trainer passes the loss mask)

Each variant runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (so that freed tensors go
back to the OS and the resident set tracks live tensors), one warm-up call (which includes the
torch.compile of the loss kernels), then the fastest of --reps calls: wall time and the process's
CPU time (all threads; less disturbed by other jobs on a shared machine). Peak extra memory: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above its RSS before one more
call, with inputs and weights already allocated; it includes the gradients the call must produce
(d hidden [tokens, hidden] and d weight [columns, hidden]).

    python benchmarks/bench_fused_loss.py                  # 4096 x 256 x 32768, fp32
    python benchmarks/bench_fused_loss.py --dtypes fp32 bf16 --chunk 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from bench_losses import _rss_bytes  # benchmarks/ is on sys.path when run as a script

VARIANTS = (
    "unfused", "fused", "fused_1pass", "unfused_sampled", "fused_sampled", "fused_sampled_1pass",
)  # fmt: skip


def make_inputs(tokens, hidden, columns, dtype):
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    hs = rnd(tokens, 1, hidden).requires_grad_(True)  # [s, b, h]
    ws = rnd(columns, hidden, scale=3.0 / hidden**0.5).requires_grad_(True)
    ht = rnd(tokens, 1, hidden)
    wt = rnd(columns, hidden, scale=2.0 / hidden**0.5)
    y = torch.randint(0, columns, (tokens, 1), generator=g)
    old = torch.full((tokens, 1), -5.0)
    return hs, ws, ht, wt, y, old


def run_variant(variant, inputs, chunk):
    from megatron_eaopd import losses as L

    hs, ws, ht, wt, y, old = inputs
    hs.grad = ws.grad = None
    cfg = L.ObjectiveConfig(name="eopd", top_k=16, chunk_size=chunk, fused_chunk_size=chunk)
    if variant == "unfused":
        with torch.no_grad():
            teacher_logits = ht @ wt.T
        loss, _ = L.vocab_parallel_eopd_loss(hs @ ws.T, teacher_logits)
    elif variant == "fused":
        loss, _ = L.vocab_parallel_linear_eopd_loss(hs, ws, ht, wt, chunk_size=chunk)
    elif variant == "fused_1pass":
        ones = torch.ones(hs.shape[:-1])
        loss, _ = L.vocab_parallel_linear_eopd_loss(
            hs, ws, ht, wt, chunk_size=chunk, grad_weights=ones
        )
    elif variant == "unfused_sampled":
        with torch.no_grad():
            payload = L.vocab_parallel_teacher_payload(ht @ wt.T, y, 16)
        loss, _ = L.sampled_objective(cfg, hs @ ws.T, y, old, payload)
    elif variant in ("fused_sampled", "fused_sampled_1pass"):
        payload = L.vocab_parallel_linear_teacher_payload(ht, wt, y, 16, chunk_size=chunk)
        ones = torch.ones(hs.shape[:-1]) if variant.endswith("1pass") else None
        loss, _ = L.linear_sampled_objective(cfg, hs, ws, y, old, payload, grad_weights=ones)
    else:
        raise ValueError(variant)
    loss.sum().backward()


def measure(args):
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
    inputs = make_inputs(args["tokens"], args["hidden"], args["columns"], dtype)
    chunk = args["chunk"]
    run_variant(args["variant"], inputs, chunk)  # warm-up (and compile)
    times, cpu = [], []
    for _ in range(args["reps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        run_variant(args["variant"], inputs, chunk)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    inputs[0].grad = inputs[1].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_bytes("VmRSS")
    run_variant(args["variant"], inputs, chunk)
    peak = _rss_bytes("VmHWM") - base
    return {"time": min(times), "cpu": min(cpu), "mem": peak}


def run_case(variant, dtype, chunk, a):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        payload = dict(variant=variant, dtype=dtype, chunk=chunk, tokens=a.tokens,
                       hidden=a.hidden, columns=a.columns, reps=a.reps, out=out)  # fmt: skip
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run([sys.executable, __file__, "--child", json.dumps(payload)], env=env,
                       check=True)  # fmt: skip
        with open(out) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--columns", type=int, default=32768, help="vocabulary columns per TP rank")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument(
        "--chunk", type=int, nargs="+", default=[None],
        help="tokens per chunk of the fused variants (default: 2**24 / columns)",
    )  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    print(f"# {a.tokens} tokens x hidden {a.hidden} x {a.columns} columns, CPU, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    rows = []
    for dtype in a.dtypes:
        for variant in a.variants:
            chunks = a.chunk if variant.startswith("fused") else [None]
            for chunk in chunks:
                res = run_case(variant, dtype, chunk, a)
                row = dict(variant=variant, dtype=dtype, chunk=chunk, **res)
                rows.append(row)
                print(json.dumps(row), flush=True)
    _print_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def _print_table(rows):
    print("\n| dtype | variant | chunk (tokens) | wall s | cpu s | peak extra MiB | "
          "memory vs unfused | time vs unfused (cpu) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base_name = "unfused_sampled" if "sampled" in r["variant"] else "unfused"
        base = next((b for b in rows if b["variant"] == base_name and b["dtype"] == r["dtype"]),
                    None)  # fmt: skip
        mem = time_ = ""
        if base is not None and base["mem"] > 0:
            mem = f"{r['mem'] / base['mem']:.3f}x"
            time_ = f"{r['time'] / base['time']:.2f}x ({r['cpu'] / base['cpu']:.2f}x)"
        chunk = r["chunk"] if r["chunk"] is not None else "default"
        if not r["variant"].startswith("fused"):
            chunk = "-"
        print(f"| {r['dtype']} | {r['variant']} | {chunk} | {r['time']:.3f} | {r['cpu']:.3f} | "
              f"{r['mem'] / 2**20:.0f} | {mem} | {time_} |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        args = json.loads(sys.argv[2])
        with open(args["out"], "w") as f:
            json.dump(measure(args), f)
    else:
        main()
