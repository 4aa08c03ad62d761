"""A/B checks behind FastDecoder's CPU choices (docs/trainer.md, "what was tried"), 1 thread.

Sections (``--sections``, default all), each printed as a table:

- ``gemm``: ``F.linear(x, W)`` (the transposed-operand GEMM of a row-major [out, in] weight)
  against ``x @ Wt`` with a contiguous [in, out] copy, for the linears of the rollout benchmark's
  shape at decode batch ``--batch``; microseconds per call, best of 3 timings of 300 calls.
- ``weights``: whole ``generate`` calls (``bench_rollout.py``'s model and uniform workload: batch
  32, 16-token prompts, 128 new tokens, 4 x 256, vocabulary 4096) with FastDecoder's [in, out]
  weight copies and without them (copies dropped after construction), calls alternating in one
  process so that the machine's drift hits both; best call of ``--reps`` after one warm-up each,
  and whether the two produced the same tokens.
- ``attention``: a decode step's attention (r = 2 query heads per group against cache lengths 20,
  80, 144) through SDPA's CPU kernel against two matmuls and a softmax.

    python benchmarks/bench_decode_ab.py
    python benchmarks/bench_decode_ab.py --sections weights --reps 8
"""

from __future__ import annotations

import argparse
import socket
import time

import torch
import torch.nn.functional as F


def _per_call_us(fn, n=300, rounds=3):
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def gemm(args):
    h = args.hidden
    print(f"\n### F.linear vs x @ Wt, decode batch {args.batch}, 1 thread (us per call, best)\n")
    print("| weight [out, in] | F.linear | x @ Wt | ratio |")
    print("|---|---|---|---|")
    for out_f, in_f in ((args.vocab, h), (2 * h, h), (h, h), (6 * h, h), (h, 3 * h)):
        x, w = torch.randn(args.batch, 1, in_f), torch.randn(out_f, in_f)
        wt = w.t().contiguous()
        a = _per_call_us(lambda x=x, w=w: F.linear(x, w))
        b = _per_call_us(lambda x=x, wt=wt: x @ wt)
        print(f"| [{out_f}, {in_f}] | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


def weights(args):
    import bench_rollout as B  # benchmarks/ is on sys.path when run as a script

    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.rollout import fast_decode as FD

    ns = argparse.Namespace(batch=32, prompt=16, new=128, layers=4, hidden=args.hidden, heads=4,
                            vocab=args.vocab)  # fmt: skip
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    B._init(0, 1, port)
    model, _ = B._model(ns, 1)
    prompts = B._prompts(ns, ns.vocab)
    use = {"copies": True}
    init = FD.FastDecoder.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        if not use["copies"]:
            self.transposed = {}

    FD.FastDecoder.__init__ = patched

    def run():
        return generate(model, prompts, max_new_tokens=ns.new, eos_id=-1, pad_id=0,
                        vocab_size=ns.vocab, params=SamplingParams(),
                        generator=torch.Generator().manual_seed(1), compact_frac=0.25)  # fmt: skip

    times, tokens = {True: [], False: []}, {}
    for i in range(args.reps + 1):
        for on in (True, False):
            use["copies"] = on
            t = time.perf_counter()
            out = run()
            if i:  # the first round is a warm-up (and the sampler's compile)
                times[on].append(time.perf_counter() - t)
            tokens[on] = out.tokens
    FD.FastDecoder.__init__ = init
    a, b = min(times[True]), min(times[False])
    print(f"\n### generate with and without the [in, out] weight copies (best of {args.reps})\n")
    print("| decoder | best call (s) | all calls (s) |")
    print("|---|---|---|")
    for on, name in ((True, "with copies"), (False, "F.linear on the parameters")):
        print(f"| {name} | {min(times[on]):.3f} | {' '.join(f'{x:.2f}' for x in times[on])} |")
    same = torch.equal(tokens[True], tokens[False])
    print(f"\nwith / without: {a / b:.3f}x; identical tokens: {same}")


def attention(args):
    n, g, r, d = args.batch, 2, 2, args.hidden // 4
    cache_k, cache_v = torch.randn(n, g, 200, d), torch.randn(n, g, 200, d)
    print(f"\n### decode attention, [{n}, {g} groups, {r} heads, d {d}] (us per call, best)\n")
    print("| cache length | SDPA | matmul + softmax + matmul | max difference |")
    print("|---|---|---|---|")
    for length in (20, 80, 144):
        q = torch.randn(n, g, r, d)
        k, v = cache_k[:, :, :length], cache_v[:, :, :length]
        scale = d**-0.5

        def manual(q=q, k=k, v=v, scale=scale):
            return torch.matmul(torch.softmax(q @ k.transpose(-1, -2) * scale, -1), v)

        def sdpa(q=q, k=k, v=v, scale=scale):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        diff = float((manual() - sdpa()).abs().max())
        print(f"| {length} | {_per_call_us(sdpa):.1f} | {_per_call_us(manual):.1f} | "
              f"{diff:.1e} |")  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=["gemm", "weights", "attention"],
                   choices=["gemm", "weights", "attention"])  # fmt: skip
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.sections:
        globals()[name](args)


if __name__ == "__main__":
    main()
