"""Torch calls per decode step of ``rollout.generate`` (FastDecoder and the vocab-parallel
sampler), by the function of ours that makes them.

Every torch function and tensor method called from Python counts (views and indexing included),
through a ``TorchFunctionMode`` whose frame walk names the first caller outside torch. On a GPU
each such call is host work and most are a kernel launch, so this is the per-step host overhead
that CUDA graphs would remove; on one CPU thread at rollout batch sizes each costs a few us.
Two ``generate`` calls that differ only in the number of new tokens are counted and subtracted,
so the prefill and the first-step check cancel: what is left is per decode step. The count does
not depend on the batch or the vocabulary (tests/benchmarks/test_count_decode_ops.py).

``--time`` also measures the seconds per decode step the same way (two uncounted calls of each
length, best of ``--reps``, subtracted), ours and transformers' ``generate`` on the same weights
(``bench_rollout.py``'s export). At a tiny width and batch 1 the arithmetic is negligible and
the time per step is the host's: what each eager loop costs per token before any kernel runs,
a floor for the launch-bound regime of a GPU.

    python benchmarks/count_decode_ops.py               # bench_rollout.py's shape (4 x 256)
    python benchmarks/count_decode_ops.py --layers 28 --hidden 2048 --heads 16 --vocab 151936
    python benchmarks/count_decode_ops.py --layers 28 --hidden 64 --heads 4 --batch 1 --time
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

_GROUPS = {"fast_decode.py": "model (FastDecoder)", "generate.py": "decode loop",
           "continuous.py": "decode loop", "sampling.py": "sampler",
           "vocab_parallel.py": "sampler", "_common.py": "sampler"}  # fmt: skip


class _Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
            frame = frame.f_back
        where = "?"
        if frame is not None:
            where = f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)})"
        self.calls[where] += 1
        return func(*args, **(kwargs or {}))


def per_step(args, new: tuple[int, int] = (8, 16)) -> dict[str, float]:
    """Torch calls per decode step by caller, from two uniform ``generate`` calls of ``new``
    tokens (EOS off: every row decodes every step). Needs torch.distributed initialised (one
    rank); builds the model with bench_rollout.py's ``_model``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_rollout

    from megatron_eaopd.rollout import SamplingParams, generate

    model, _ = bench_rollout._model(argparse.Namespace(**{**vars(args), "new": max(new)}), 1)
    prompts = bench_rollout._prompts(args, args.vocab)
    counts = []
    for n in (new[0], new[0], new[1]):  # the first call warms up
        mode = _Count()
        with mode:
            generate(model, prompts, max_new_tokens=n, eos_id=-1, pad_id=0,
                     vocab_size=args.vocab, params=SamplingParams(),
                     generator=torch.Generator().manual_seed(1))  # fmt: skip
        counts.append(mode.calls)
    short, long = counts[1], counts[2]
    steps = new[1] - new[0]
    return {k: (long[k] - short.get(k, 0)) / steps for k in long if long[k] != short.get(k, 0)}


def seconds_per_step(args, new: tuple[int, int] = (16, 48), reps: int = 3) -> dict[str, float]:
    """Process CPU seconds per decode step of ours and of transformers' ``generate`` (uniform
    workload, EOS off, plain sampling at temperature 1): (best call of ``new[1]`` tokens - best
    call of ``new[0]``) / their difference, calls alternating, one warm-up round. Needs
    torch.distributed initialised (one rank)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_rollout

    from megatron_eaopd.rollout import SamplingParams, generate

    model, cfg = bench_rollout._model(argparse.Namespace(**{**vars(args), "new": max(new)}), 1)
    prompts = bench_rollout._prompts(args, args.vocab)
    ids = torch.tensor(prompts)
    hf = bench_rollout._hf_copy(model, cfg, None)

    def ours(n):
        generate(model, prompts, max_new_tokens=n, eos_id=-1, pad_id=0, vocab_size=args.vocab,
                 params=SamplingParams(), generator=torch.Generator().manual_seed(1))  # fmt: skip

    def theirs(n):
        torch.manual_seed(1)
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                        eos_token_id=None, pad_token_id=0)  # fmt: skip

    best = {}
    for rep in range(reps + 1):  # round 0 warms up
        for name, fn in (("ours", ours), ("transformers", theirs)):
            for n in new:
                c0 = time.process_time()
                fn(n)
                if rep:
                    key = (name, n)
                    best[key] = min(best.get(key, float("inf")), time.process_time() - c0)
    steps = new[1] - new[0]
    return {name: (best[name, new[1]] - best[name, new[0]]) / steps
            for name in ("ours", "transformers")}  # fmt: skip


def _table(rows: dict[str, float], args) -> str:
    by_group = collections.Counter()
    for where, n in rows.items():
        by_group[_GROUPS.get(where.rsplit("(", 1)[-1].rstrip(")"), "other")] += n
    lines = [f"### torch calls per decode step: {args.layers} x {args.hidden}, {args.heads} "
             f"heads, vocab {args.vocab}, batch {args.batch}, TP 1, "
             f"{getattr(args, 'params_dtype', 'float32')}\n",
             "| part | calls / step |", "|---|---|"]  # fmt: skip
    lines += [f"| {g} | {n:.1f} |" for g, n in by_group.most_common()]
    lines += [f"| **total** | **{sum(rows.values()):.1f}** |", "",
              "| function | calls / step |", "|---|---|"]  # fmt: skip
    lines += [f"| {w} | {n:.1f} |" for w, n in sorted(rows.items(), key=lambda r: -r[1])]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--dtype",
        dest="params_dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the model's dtype; bfloat16 counts the path a bf16 GPU model takes (its "
        "norms as modules: FastDecoder folds and fuses them for fp32 only)",
    )
    p.add_argument("--time", action="store_true", help="also seconds per step, ours and HF")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_rollout
    import torch.distributed as dist

    bench_rollout._init(0, 1, int(os.environ.get("MASTER_PORT", "29517")))  # gloo, 1 thread
    try:
        calls = per_step(args)
        print(_table(calls, args))
        if args.time:
            sec = seconds_per_step(args, reps=args.reps)
            total = sum(calls.values())
            print(f"\n### time per decode step (process CPU, 1 thread, best of {args.reps})\n")
            print("| decoder | us / step | us / torch call |\n|---|---|---|")
            print(f"| ours | {sec['ours'] * 1e6:.0f} | {sec['ours'] * 1e6 / total:.1f} |")
            print(f"| transformers | {sec['transformers'] * 1e6:.0f} | - |")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
