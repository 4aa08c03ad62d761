"""Benchmark: the exact full-vocabulary EOPD loss (forward + backward) against a straightforward
autograd version and against the inherent work, on CPU (gloo, TP 1/2) or one CUDA device.

Variants, each in fresh processes, on [tokens, columns] logits shards per rank:
  ours      megatron_eaopd.losses.vocab_parallel_eopd_loss (torch.compile'd kernels)
  eager     the same with EAOPD_COMPILE=0 (no fusion)
  naive     all_gather of both shards + log_softmax + kl_div + entropy, plain autograd
  inherent  one buffer allocated, then exp of both shards in forward and again in backward
            written into it (the floor any exact implementation pays)

Time: the fastest of --reps forward+backward calls after one warm-up, as wall time and as this
process's CPU time (all its threads; robust to other jobs on a shared machine). Peak extra memory:
CPU, the process's peak RSS (VmHWM, reset via /proc/self/clear_refs) above its RSS before the
call; CUDA, torch.cuda.max_memory_allocated above the allocated bytes before the call. Max over
TP ranks.

    python benchmarks/bench_losses.py                       # CPU: 4096 x 32768, TP 1 and 2
    python benchmarks/bench_losses.py --device cuda --tokens 8192 --columns 75968 --tp 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

VARIANTS = ("ours", "eager", "naive", "inherent")


# ----------------------------------------------------------------------------- the variants


class _GatherVocab(torch.autograd.Function):
    """all_gather along the vocabulary; backward keeps this rank's slice (every rank computes
    the same full loss)."""

    @staticmethod
    def forward(ctx, x, group):
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


def naive_eopd(student, teacher, group, tau=0.8):
    if group is not None:
        student, teacher = _GatherVocab.apply(student, group), _GatherVocab.apply(teacher, group)
    ls = torch.log_softmax(student.float(), dim=-1)
    lt = torch.log_softmax(teacher.float(), dim=-1)
    rkl = torch.nn.functional.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    fkl = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    h_t = -(lt.exp() * lt).sum(-1)
    return rkl + (h_t > tau).float() * fkl


def run_variant(variant, student, teacher, group):
    if variant == "inherent":
        with torch.no_grad():
            buf = torch.empty_like(student, dtype=torch.float32)
            for x in (student, teacher, student, teacher):
                torch.exp(x, out=buf)
        return
    student.grad = None
    if variant == "naive":
        loss = naive_eopd(student, teacher, group)
    else:
        from megatron_eaopd.losses import vocab_parallel_eopd_loss

        loss, _ = vocab_parallel_eopd_loss(student, teacher, tp_group=group)
    loss.sum().backward()


# ----------------------------------------------------------------------------- measurement


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(variant, tokens, columns, dtype, device, reps, group):
    torch.manual_seed(1234 + (dist.get_rank() if group is not None else 0))
    student = torch.randn(tokens, columns, device=device).to(dtype).requires_grad_(True)
    teacher = torch.randn(tokens, columns, device=device).to(dtype)
    run_variant(variant, student, teacher, group)  # warm-up (and compile)
    student.grad = None
    times, cpu_times = [], []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        run_variant(variant, student, teacher, group)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        student.grad = None
    # peak extra memory of one more call
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_variant(variant, student, teacher, group)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_bytes("VmRSS")
        run_variant(variant, student, teacher, group)
        peak = _rss_bytes("VmHWM") - base
    return min(times), min(cpu_times), peak


def _worker(rank, world, port, args, out_path):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        group = dist.group.WORLD
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
    t, cpu, mem = measure(
        args["variant"], args["tokens"], args["columns"], dtype, args["device"], args["reps"], group
    )
    if world > 1:
        res = torch.tensor([t, cpu, float(mem)], dtype=torch.float64)
        dist.all_reduce(res, op=dist.ReduceOp.MAX)
        t, cpu, mem = res.tolist()
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"time": t, "cpu": cpu, "mem": mem}, f)


def _child_main():
    args = json.loads(sys.argv[2])
    rank = int(os.environ.get("BENCH_RANK", "0"))
    _worker(rank, args["tp"], args["port"], args, args["out"])


def run_case(variant, tp, dtype, a):
    """Launch `tp` fresh processes for one measurement; return (wall s, CPU s, peak extra bytes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        payload = dict(variant=variant, tp=tp, dtype=dtype, tokens=a.tokens, columns=a.columns,
                       device=a.device, reps=a.reps, port=port, out=out)  # fmt: skip
        env = dict(os.environ, EAOPD_COMPILE="0" if variant == "eager" else "1")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(payload)],
                env=dict(env, BENCH_RANK=str(r)),
            )  # fmt: skip
            for r in range(tp)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"{variant} tp{tp} {dtype} failed: exit codes {codes}")
        with open(out) as f:
            res = json.load(f)
    return res["time"], res["cpu"], res["mem"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--columns", type=int, default=32768, help="vocabulary columns per TP rank")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    rows = []
    print(f"# {a.tokens} tokens x {a.columns} columns per rank, device {a.device}", flush=True)
    for tp in a.tp:
        for dtype in a.dtypes:
            res = {v: run_case(v, tp, dtype, a) for v in a.variants}
            row = dict(tp=tp, dtype=dtype, **{f"{v}_s": res[v][0] for v in res},
                       **{f"{v}_cpu_s": res[v][1] for v in res},
                       **{f"{v}_gib": res[v][2] / 2**30 for v in res})  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    _print_table(rows, a.variants)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def _print_table(rows, variants):
    head = ["tp", "dtype"] + [f"{v} s" for v in variants] + [f"{v} GiB" for v in variants]
    have = set(variants)
    ratios = []
    if {"ours", "naive"} <= have:
        ratios += ["naive/ours time (cpu)", "naive/ours mem"]
    if {"ours", "inherent"} <= have:
        ratios += ["ours/inherent time (cpu)"]
    print("\n| " + " | ".join(head + ratios) + " |")
    print("|" + "---|" * (len(head) + len(ratios)))
    for r in rows:
        cells = [str(r["tp"]), r["dtype"]]
        cells += [f"{r[f'{v}_s']:.3f}" for v in variants]
        cells += [f"{r[f'{v}_gib']:.2f}" for v in variants]

        def ratio(a, b, unit, r=r):
            den = r[f"{b}_{unit}"]
            return f"{r[f'{a}_{unit}'] / den:.2f}x" if den > 0 else "n/a"

        if "naive/ours mem" in ratios:
            cells += [f"{ratio('naive', 'ours', 's')} ({ratio('naive', 'ours', 'cpu_s')})"]
            cells += [ratio("naive", "ours", "gib")]
        if "ours/inherent time (cpu)" in ratios:
            cells += [f"{ratio('ours', 'inherent', 's')} ({ratio('ours', 'inherent', 'cpu_s')})"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main()
    else:
        main()
