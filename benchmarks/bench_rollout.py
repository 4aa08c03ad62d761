"""Benchmark: rollouts with megatron's static KV cache against re-running the whole prefix.

Both decoders are ``megatron_eaopd.rollout.generate`` (``use_kv_cache`` True / False) on the same
randomly initialised GPTModel, the same prompts and the same generator seed; EOS is disabled so
every sequence decodes exactly ``--new`` tokens and both do the same number of steps. Spawns TP
gloo processes on the CPU (one torch thread each). Time: median of ``--reps`` calls after one
warm-up; the speed-up is recompute time / KV-cache time.

    python benchmarks/bench_rollout.py                        # student shape of tiny-cpu, TP 1, 2
    python benchmarks/bench_rollout.py --tp 2 --batch 64 --new 32 64 128 --hidden 128 --layers 4
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model(args, tp):
    from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, 1, seed=1)
    cfg = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.heads // 2, ffn_hidden_size=3 * args.hidden,
        vocab_size=args.vocab, max_sequence_length=args.prompt + max(args.new),
        make_vocab_size_divisible_by=8,
    )  # fmt: skip
    (model,) = build_model(cfg)
    init_weights_layout_invariant([model], 0)
    return model


def _worker(rank, tp, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(tp), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron_eaopd.rollout import SamplingParams, generate

    model = _model(args, tp)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab, (args.prompt,), generator=gen).tolist()
               for _ in range(args.batch)]  # fmt: skip
    rows = []
    for new in args.new:
        row = {"new": new}
        tokens = {}
        for kv in (True, False):
            times = []
            for rep in range(args.reps + 1):
                g = torch.Generator().manual_seed(1)
                dist.barrier()
                t0 = time.perf_counter()
                out = generate(
                    model, prompts, max_new_tokens=new, eos_id=-1, pad_id=0,
                    vocab_size=args.vocab, params=SamplingParams(), generator=g, use_kv_cache=kv,
                )  # fmt: skip
                if rep > 0:
                    times.append(time.perf_counter() - t0)
            tokens[kv] = out.tokens
            row["kv" if kv else "recompute"] = statistics.median(times)
        row["same_tokens"] = bool(torch.equal(tokens[True], tokens[False]))
        rows.append(row)
    if rank == 0:
        torch.save(rows, out_path)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, nargs="+", default=[16, 32, 72])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=221)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"batch {args.batch}, prompt {args.prompt} tokens, model {args.layers} layers x "
          f"{args.hidden} hidden, vocab {args.vocab}; median of {args.reps} (s)")  # fmt: skip
    print("| TP | new tokens | KV cache (s) | recompute (s) | speed-up | same tokens |")
    print("|---|---|---|---|---|---|")
    for tp in args.tp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.start_processes(_worker, args=(tp, port, args, out), nprocs=tp, start_method="spawn")
            for r in torch.load(out):
                print(f"| {tp} | {r['new']} | {r['kv']:.3f} | {r['recompute']:.3f} | "
                      f"{r['recompute'] / r['kv']:.1f}x | {r['same_tokens']} |")  # fmt: skip


if __name__ == "__main__":
    main()
