"""A/B checks behind FastDecoder's CPU choices (docs/trainer.md, "what was tried"), 1 thread.

Sections (``--sections``, default all), each printed as a table:

- ``gemm``: ``F.linear(x, W)`` (the transposed-operand GEMM of a row-major [out, in] weight)
  against ``x @ Wt`` with a contiguous [in, out] copy and oneDNN with a pre-packed weight, for
  the linears of the rollout benchmark's shape at decode batch ``--batch``; microseconds per
  call, best of 3 timings of 300 calls.
- ``weights``: whole ``generate`` calls (``bench_rollout.py``'s model and uniform workload: batch
  32, 16-token prompts, 128 new tokens, 4 x 256, vocabulary 4096) with FastDecoder's [in, out]
  weight copies and without them (copies dropped after construction), calls alternating in one
  process so that the machine's drift hits both; process CPU time, best call of ``--reps`` after
  one warm-up each, the median of the paired ratios, and whether the two gave the same tokens.
- ``norms``: the same A/B with FastDecoder's fused norms (RMSNorm gains folded into the weight
  copies, the QK RMSNorms and RoPE of a group's queries and key in one pass) against the norm
  modules (the QK norms per tensor, RoPE of queries and keys separately).
- ``onednn``: the same A/B with the output layer's product through oneDNN with a pre-packed
  weight (an experiment, not in FastDecoder; the ``gemm`` table has its kernel alone);
  ``onednn_all``: every linear (the layers' and the output layer) through oneDNN.
- ``profile``: one uniform ``generate`` call under torch's profiler, ops by self CPU time.
- ``attention``: a decode step's attention (r = 2 query heads per group against cache lengths 20,
  80, 144) through SDPA's CPU kernel against two matmuls and a softmax.

- ``sampler``: the plain (temperature-only) sampling kernel at [``--batch``, ``--vocab``]: the
  per-column Gumbel-max (used where a shard width is not a multiple of 64; compiled as in
  rollouts, and eager) against the two-level draw (``sampling.blocked_draw``: Gumbel-max over
  blocks of columns, then inverse CDF inside the winner; shipped with blocks of 64), with each
  one's token frequencies against softmax over 20k draws of one row (max z-score over 256
  columns; 2.5-4.5 is what chance gives for the max of 256).

    python benchmarks/bench_decode_ab.py
    python benchmarks/bench_decode_ab.py --sections weights norms --reps 8
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


def _onednn_linear(w: torch.Tensor, batch: int):
    """x -> x @ w^T through oneDNN with ``w`` [out, in] pre-packed for ``batch`` rows, or None
    when this torch has no oneDNN (mkldnn) linear."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=batch)
    except (AttributeError, RuntimeError):
        return None
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def gemm(args):
    h = args.hidden
    print(f"\n### F.linear vs x @ Wt vs oneDNN (pre-packed), decode batch {args.batch}, 1 thread "
          "(us per call, best; GFLOP/s)\n")  # fmt: skip
    print("| weight [out, in] | F.linear | x @ Wt | oneDNN | GFLOP/s (F.linear / Wt / oneDNN) |")
    print("|---|---|---|---|---|")
    for out_f, in_f in ((args.vocab, h), (2 * h, h), (h, h), (6 * h, h), (h, 3 * h)):
        x, w = torch.randn(args.batch, 1, in_f), torch.randn(out_f, in_f)
        wt = w.t().contiguous()
        a = _per_call_us(lambda x=x, w=w: F.linear(x, w))
        b = _per_call_us(lambda x=x, wt=wt: x @ wt)
        dnn = _onednn_linear(w, args.batch)
        c = _per_call_us(lambda x=x, dnn=dnn: dnn(x)) if dnn else float("nan")
        flop = 2 * args.batch * in_f * out_f / 1e3  # per microsecond -> GFLOP/s
        print(f"| [{out_f}, {in_f}] | {a:.1f} | {b:.1f} | {c:.1f} | "
              f"{flop / a:.0f} / {flop / b:.0f} / {flop / c:.0f} |")  # fmt: skip


def _generate_ab(args, title, names, patch):
    """Whole ``generate`` calls (``bench_rollout.py``'s model and uniform workload), A and B
    alternating in one process; ``patch(decoder, on)`` runs after each FastDecoder is built.
    Prints the best call of each, every call, the median of the paired B / A ratios and
    whether both gave the same tokens."""
    import statistics

    import bench_rollout as B  # benchmarks/ is on sys.path when run as a script

    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.rollout import fast_decode as FD

    ns = argparse.Namespace(batch=32, prompt=16, new=128, layers=4, hidden=args.hidden, heads=4,
                            vocab=args.vocab)  # fmt: skip
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    if not torch.distributed.is_initialized():
        B._init(0, 1, port)
    model, _ = B._model(ns, 1)
    prompts = B._prompts(ns, ns.vocab)
    use = {"on": True}
    init = FD.FastDecoder.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        patch(self, use["on"])

    FD.FastDecoder.__init__ = patched

    def run():
        return generate(model, prompts, max_new_tokens=ns.new, eos_id=-1, pad_id=0,
                        vocab_size=ns.vocab, params=SamplingParams(),
                        generator=torch.Generator().manual_seed(1), compact_frac=0.25)  # fmt: skip

    times, tokens = {True: [], False: []}, {}
    try:
        for i in range(args.reps + 1):
            for on in (True, False):
                use["on"] = on
                t = time.process_time()
                out = run()
                if i:  # the first round is a warm-up (and the sampler's compile)
                    times[on].append(time.process_time() - t)
                tokens[on] = out.tokens
    finally:
        FD.FastDecoder.__init__ = init
    a, b = min(times[True]), min(times[False])
    paired = statistics.median(x / y for x, y in zip(times[True], times[False]))
    print(f"\n### {title} (CPU s per generate call, best of {args.reps})\n")
    print("| decoder | best call (s) | all calls (s) |")
    print("|---|---|---|")
    for on, name in ((True, names[0]), (False, names[1])):
        print(f"| {name} | {min(times[on]):.3f} | {' '.join(f'{x:.2f}' for x in times[on])} |")
    same = torch.equal(tokens[True], tokens[False])
    print(
        f"\nbest / best: {a / b:.3f}x; median of paired calls: {paired:.3f}x; "
        f"identical tokens: {same}"
    )


def weights(args):
    def patch(dec, on):
        if not on:  # F.linear on the parameters; the norm folding needs the copies too
            dec.transposed, dec.folded = {}, {}

    _generate_ab(args, "generate with and without the [in, out] weight copies",
                 ("with copies", "F.linear on the parameters"), patch)  # fmt: skip


def norms(args):
    def patch(dec, on):
        if not on:  # the norm modules, then RoPE of queries and keys separately
            dec.folded, dec.qk_norm = {}, [None] * len(dec.qk_norm)

    names = ("RMSNorm gains folded, QK norms + RoPE fused", "norm modules")
    _generate_ab(args, "generate with and without the fused norms", names, patch)


def onednn(args):
    """The output layer's product (the final norm's folded [in, out] copy) through oneDNN with
    a pre-packed weight, against FastDecoder's matmul (an experiment: not in FastDecoder)."""

    def patch(dec, on):
        norm = dec.module.decoder.final_layernorm
        entry = dec.folded.get(id(norm))
        dnn = _onednn_linear(entry[3].t().contiguous(), args.batch) if entry else None
        if not on or dnn is None:
            return
        plain = dec._norm_linear

        def norm_linear(n, x, weight, bias=None):
            if n is not norm:
                return plain(n, x, weight, bias)
            out = dnn(dec._rms(x, entry[1]))
            return out if bias is None else out + bias

        dec._norm_linear = norm_linear

    names = ("output layer through oneDNN", "FastDecoder as shipped")
    _generate_ab(args, "generate with the output layer through oneDNN", names, patch)


def onednn_all(args):
    """Every linear of FastDecoder (the layers' four and the output layer, norm gains folded)
    through oneDNN with weights pre-packed once per decoder, against FastDecoder's matmuls (an
    experiment: not in FastDecoder; results agree to rounding, not bitwise)."""

    def patch(dec, on):
        if not on:
            return
        packed = {key: _onednn_linear(w.detach(), args.batch)
                  for key, (w, _) in dec.transposed.items()}  # fmt: skip
        folded = {key: (eps, _onednn_linear(wt.t().contiguous(), args.batch))
                  for key, (_, eps, _, wt) in dec.folded.items()}  # fmt: skip
        if None in packed.values() or any(f is None for _, f in folded.values()):
            return  # no oneDNN linear in this torch: both sides run as shipped
        plain_matmul, plain_norm_linear = dec._matmul, dec._norm_linear

        def matmul(x, weight):
            f = packed.get(id(weight))
            return f(x) if f is not None else plain_matmul(x, weight)

        def norm_linear(norm, x, weight, bias=None):
            if id(norm) not in folded:
                return plain_norm_linear(norm, x, weight, bias)
            eps, f = folded[id(norm)]
            out = f(dec._rms(x, eps))
            return out if bias is None else out + bias

        dec._matmul, dec._norm_linear = matmul, norm_linear

    names = ("every linear through oneDNN", "FastDecoder as shipped")
    _generate_ab(args, "generate with every linear through oneDNN", names, patch)


def profile(args):
    """The ops of one uniform ``generate`` call (bench_rollout.py's model and workload) by self
    CPU time, under torch's profiler (which adds its own overhead)."""
    import bench_rollout as B  # benchmarks/ is on sys.path when run as a script

    from megatron_eaopd.rollout import SamplingParams, generate

    ns = argparse.Namespace(batch=32, prompt=16, new=128, layers=4, hidden=args.hidden, heads=4,
                            vocab=args.vocab)  # fmt: skip
    if not torch.distributed.is_initialized():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        B._init(0, 1, port)
    model, _ = B._model(ns, 1)
    prompts = B._prompts(ns, ns.vocab)

    def run():
        return generate(model, prompts, max_new_tokens=ns.new, eos_id=-1, pad_id=0,
                        vocab_size=ns.vocab, params=SamplingParams(),
                        generator=torch.Generator().manual_seed(1), compact_frac=0.25)  # fmt: skip

    run()  # warm-up
    with torch.profiler.profile() as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n### one uniform generate call under the profiler: {total:.2f} s self CPU\n")
    print("| op | self CPU (s) | share | calls |")
    print("|---|---|---|---|")
    for e in events[:12]:
        t = e.self_cpu_time_total / 1e6
        print(f"| {e.key} | {t:.3f} | {t / total:.0%} | {e.count} |")


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


def _blocked_draw(x, rkeys, block):
    """The shipped two-level draw (``sampling.blocked_draw``) over blocks of ``block`` columns of
    x [n, w]; the columns [n]."""
    from megatron_eaopd.rollout.sampling import block_view, blocked_draw

    return blocked_draw(block_view(x, block), rkeys, 0)[1]


def sampler(args):
    from megatron_eaopd.rollout.sampling import column_keys, row_keys
    from megatron_eaopd.rollout.vocab_parallel import _plain_local, _plain_local_eager

    n, w = args.batch, args.vocab
    torch.manual_seed(0)
    x = torch.randn(n, w) * 2
    rk, ck = row_keys(7, torch.arange(n)), column_keys(0, w)
    print(f"\n### plain sampling kernel, [{n}, {w}] (us per call, best)\n")
    print("| kernel | us per call | frequencies vs softmax (max z over columns, 20k draws) |")
    print("|---|---|---|")
    draws, row = 20000, torch.randn(1, 256) * 2
    probs = torch.softmax(row.double(), -1)[0]

    def zmax(cols):
        freq = torch.bincount(cols, minlength=256).double() / draws
        return float(((freq - probs).abs() / (probs * (1 - probs) / draws).sqrt()).max())

    many = row.expand(draws, 256).contiguous()
    rows_k = row_keys(11, torch.arange(draws))
    current = _plain_local_eager(many, rows_k, column_keys(0, 256), 1.0, 1.0)[:, 4].long()
    variants = [("per-column Gumbel (widths not multiples of 64; compiled when enabled)",
                 lambda: _plain_local(x, rk, ck, 1.0, 1.0), zmax(current)),
                ("per-column Gumbel, eager", lambda: _plain_local_eager(x, rk, ck, 1.0, 1.0),
                 zmax(current))]  # fmt: skip
    for block in (8, 16, 64):
        z = zmax(_blocked_draw(many, rows_k, block))
        name = f"two-level, blocks of {block}" + (" (shipped)" if block == 64 else "")
        variants.append((name, lambda b=block: _blocked_draw(x, rk, b), z))
    for name, fn, z in variants:
        print(f"| {name} | {_per_call_us(fn, n=100):.0f} | {z:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = ["gemm", "weights", "norms", "onednn", "onednn_all", "attention", "sampler",
             "profile"]  # fmt: skip
    p.add_argument("--sections", nargs="+", default=names, choices=names)
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
