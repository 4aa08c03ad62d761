"""Rollout throughput on one GPU at the paper's student shape: ours vs transformers' ``generate``.

The issue's GPU measurement: a Qwen3-1.7B-shaped student (28 x 2048, 16 / 8 heads of 128, tied
151,936 vocabulary) with random weights, ``--batch`` 128 prompts of ``--prompt`` 512 random tokens,
``--new`` 1024 new tokens each (EOS off, so every row decodes the same number of tokens),
``--dtype`` bf16, temperature 1, top-k off, top-p 1 (transformers: ``do_sample=True, top_k=0,
top_p=1.0``). One process, TP 1 / PP 1 (NCCL on CUDA, gloo on CPU).

Decoders, each run once as a warm-up (``--warmup-new`` tokens) and then ``--reps`` times:

- ``ours``: ``rollout.generate`` (FastDecoder where its first-step check accepts it; the table says
  whether it did);
- ``ours, CUDA graphs``: ``generate(decode_graphs=True)``: decode steps at static shapes replayed
  as CUDA graphs (on a CPU the static-shape steps run eagerly; the path column says which);
- ``ours, megatron forward``: ``generate(fast_decode=False)`` (megatron's forward with its
  ``StaticInferenceContext``);
- ``transformers``: the same weights exported with ``save_hf_weights`` and loaded as
  ``Qwen3ForCausalLM``;
- megatron-core's dynamic inference engine: only probed. megatron-core 0.16.1 asserts flash-attn
  >= 2.7.3 or FA3 for dynamic batching (``transformer/attention.py``); the row says whether it is
  importable here (docs/trainer.md records the decision).

Printed: tokens, wall seconds (device synchronised), tokens/s, the ratio to transformers and the
peak device memory of each call. ``--json`` also writes the rows. On a CPU (``--device cpu``) the
same code runs at a small shape: the smoke test in tests/benchmarks.

    python benchmarks/bench_rollout_gpu.py --json out.json
    python benchmarks/bench_rollout_gpu.py --device cpu --layers 2 --hidden 64 --heads 4 \\
        --groups 2 --ffn 128 --vocab 512 --batch 4 --prompt 8 --new 8 --dtype fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist

DTYPES = {"bf16": ("bfloat16", torch.bfloat16), "fp32": ("float32", torch.float32)}


def _config(args):
    from megatron_eaopd.models.config import QWEN3_1_7B

    return dataclasses.replace(
        QWEN3_1_7B, num_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=args.heads, num_query_groups=args.groups,
        kv_channels=args.hidden // args.heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_sequence_length=args.prompt + args.new, params_dtype=DTYPES[args.dtype][0],
    )  # fmt: skip


def _init(device: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    if device == "cuda":
        torch.cuda.set_device(0)  # one process, LOCAL_RANK 0's GPU
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str):
    """(result, wall seconds, peak device bytes or None)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return out, wall, peak


def dynamic_engine_probe() -> str:
    """Why megatron-core's dynamic engine can or cannot run here (it is not run either way)."""
    fa = [m for m in ("flash_attn_3", "flashattn_hopper", "flash_attn")
          if importlib.util.find_spec(m) is not None]  # fmt: skip
    if not torch.cuda.is_available():
        return "not run: CUDA only (its context allocates on torch.cuda.current_device())"
    if not fa:
        return "not run: needs flash-attn >= 2.7.3 or FA3, not installed (no binary wheel)"
    return f"not run: {', '.join(fa)} importable; no harness for the engine (docs/trainer.md)"


@torch.no_grad()
def random_init(model, seed: int, std: float = 0.02) -> None:
    """Norm gains 1, biases 0, every other weight N(0, std), drawn on the parameter's device
    (``init_weights_layout_invariant`` draws each global tensor on the CPU: minutes at 1.7B)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("weight") and "norm" in ".".join(name.split(".")[-2:]):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


def _save(rows: list[dict], args) -> None:
    """The rows so far (after each decoder: a run killed at its time limit keeps them)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


def run(args) -> list[dict]:
    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.hf import save_hf_weights
    from megatron_eaopd.parallel.init import initialize_parallel
    from megatron_eaopd.rollout import SamplingParams, generate

    device, (_, dtype) = args.device, DTYPES[args.dtype]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu for the small smoke run)")
    _init(device)
    initialize_parallel(1, 1, seed=1)
    cfg = _config(args)
    (model,) = build_model(cfg)
    random_init(model, seed=0)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, args.vocab, (args.prompt - 1,), generator=gen).tolist()
               for _ in range(args.batch)]  # fmt: skip

    def ours(fast: bool, new: int, graphs: bool = False):
        stats: dict = {}
        out = generate(model, prompts, max_new_tokens=new, eos_id=-1, pad_id=0,
                       vocab_size=args.vocab, params=SamplingParams(), fast_decode=fast,
                       generator=torch.Generator().manual_seed(1), stats=stats,
                       decode_graphs=graphs)  # fmt: skip
        path = "FastDecoder" if stats["fast"] else "megatron"
        if stats["graph_captures"]:
            path += f", {stats['graph_captures']} graphs, {stats['graph_replays']} replays"
        elif stats["static_eager"]:
            path += f", no graphs: {stats['static_eager']} steps run eagerly"
        return int(out.response_lens.sum()), path

    variants = {"ours": lambda new: ours(True, new)}
    if args.transformers:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as hf_dir:
            save_hf_weights([model], hf_dir, model_config=cfg, dtype=args.dtype, overwrite=True,
                            token_ids={"bos_token_id": 1, "eos_token_id": 2,
                                       "pad_token_id": 0})  # fmt: skip
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        hf.generation_config.eos_token_id = None
        ids = torch.tensor(prompts, device=device)

        def theirs(new):
            torch.manual_seed(1)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                  pad_token_id=0)  # fmt: skip
            return int(out[:, ids.shape[1] :].numel()), "-"

        variants["transformers"] = theirs
    if args.graphs:  # after transformers': a capture gone wrong cannot cost that row
        variants["ours, CUDA graphs"] = lambda new: ours(True, new, graphs=True)
    # last: the slowest, and the least needed (megatron's forward with its static KV cache)
    variants["ours, megatron forward"] = lambda new: ours(False, new)
    rows = [dict(name="megatron dynamic engine", note=dynamic_engine_probe())]
    _save(rows, args)
    for name, fn in variants.items():
        fn(args.warmup_new)  # warm-up: allocations, kernels, lazy initialisation
        best = None
        for _ in range(args.reps):
            (tokens, path), wall, peak = _timed(lambda fn=fn: fn(args.new), device)
            if best is None or wall < best["wall"]:
                best = dict(name=name, tokens=tokens, wall=wall, peak=peak, path=path)
            print(f"  {name}: {tokens} tokens in {wall:.2f} s ({path})", flush=True)
        rows.append(best)
        _save(rows, args)
        if device == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return rows


def print_table(rows: list[dict], args) -> None:
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n### {card}: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.layers} x {args.hidden} (heads {args.heads}/{args.groups}, ffn {args.ffn}), "
          f"vocab {args.vocab}, {args.dtype}; best of {args.reps}\n")  # fmt: skip
    print("| decoder | path | tokens | wall (s) | tokens/s | x transformers | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    ref = next((r for r in rows if r["name"] == "transformers"), None)
    for r in sorted(rows, key=lambda r: "note" in r):  # the probe's row last
        if "note" in r:
            print(f"| {r['name']} | {r['note']} | | | | | |")
            continue
        speed = r["tokens"] / r["wall"]
        ratio = f"{speed / (ref['tokens'] / ref['wall']):.2f}x" if ref else "-"
        peak = f"{r['peak'] / 2**30:.1f}" if r["peak"] is not None else "-"
        print(f"| {r['name']} | {r['path']} | {r['tokens']} | {r['wall']:.2f} | {speed:.0f} | "
              f"{ratio} | {peak} |")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=1024)
    p.add_argument("--warmup-new", type=int, default=4)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--no-transformers", dest="transformers", action="store_false")
    p.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_false",
        help="skip the generate(decode_graphs=True) row",
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    for name in ("batch", "prompt", "new", "warmup_new", "reps", "layers", "hidden", "heads",
                 "groups", "ffn", "vocab"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden % args.heads or args.heads % args.groups:
        p.error("--hidden must be a multiple of --heads, and --heads of --groups")
    if args.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = run(args)
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main()
