"""Benchmark: import a ~1B-parameter HF model at TP 2; time and peak memory per rank.

Writes a random Llama-shaped model (TinyLlama-1.1B's shape by default: 22 layers, hidden 2048,
32 heads, 4 KV heads, ffn 5632, vocab 32000, untied; bf16) as sharded safetensors with its
config.json, written tensor by tensor with safetensors directly (no transformers). Then spawns
`--tp` gloo processes that do what `eaopd-convert import-hf --tp N` does: build the model without
initialisation (bf16), `load_hf_weights` (each rank reads only its blocks), `save_checkpoint`
(model only). Per rank it prints the time of each phase, the rank's share of the weights (bytes
of its parameters), the resident memory after the imports (baseline), and the peak resident
memory (VmHWM) after loading and after the checkpoint save, with the ratio to the share both
with and without the baseline (torch + megatron + Python).

    python benchmarks/bench_convert.py                      # ~1.1B, TP 2, files under /tmp
    python benchmarks/bench_convert.py --layers 4 --tp 2    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so a spawned
    # worker would report the parent's peak (here: the parent that wrote the weights)
    return _status_mb("VmHWM")


def write_model(path: str, args) -> int:
    """Random bf16 Llama weights + config.json in shards of ~1 GiB; returns the parameter count."""
    from safetensors.torch import save_file

    from megatron_eaopd.models import ModelConfig
    from megatron_eaopd.models.hf import expected_hf_shapes, hf_config_dict

    cfg = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_sequence_length=2048, params_dtype="bfloat16", architecture="LlamaForCausalLM",
    )  # fmt: skip
    os.makedirs(path)
    shapes = expected_hf_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        current[key] = t
        size += t.numel() * 2
        total += t.numel()
        if size >= 2**30:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    shards.clear()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype="bfloat16"), f, indent=2)
    return total


def _worker(rank, world, port, hf_dir, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.checkpoint import save_checkpoint
    from megatron_eaopd.models.hf import load_hf_weights, model_config_from_hf
    from megatron_eaopd.parallel.init import initialize_parallel

    cfg = model_config_from_hf(hf_dir)
    initialize_parallel(world, 1, seed=1)
    import megatron.core.dist_checkpointing  # noqa: F401 - count its import in the baseline

    row = {"rank": rank, "baseline_mb": _rss_mb()}
    t0 = time.perf_counter()
    chunks = build_model(cfg, perform_initialization=False)
    row["build_s"] = time.perf_counter() - t0
    row["share_mb"] = sum(p.numel() * p.element_size() for p in chunks[0].parameters()) / 2**20
    t1 = time.perf_counter()
    load_hf_weights(chunks, hf_dir, progress=rank == 0)
    dist.barrier()
    row["load_s"] = time.perf_counter() - t1
    row["peak_load_mb"] = _peak_mb()
    t2 = time.perf_counter()
    save_checkpoint(out_dir, 0, chunks, save_rng=False, source=f"hf:{hf_dir}")
    row["save_s"] = time.perf_counter() - t2
    row["peak_total_mb"] = _peak_mb()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    hf_dir, out_dir = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    try:
        t = time.perf_counter()
        total = write_model(hf_dir, args)
        print(f"wrote {total / 1e9:.2f}B parameters (bf16) in {time.perf_counter() - t:.0f} s")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.perf_counter()
        mp.start_processes(_worker, args=(args.tp, port, hf_dir, out_dir, work),
                           nprocs=args.tp, start_method="spawn")  # fmt: skip
        wall = time.perf_counter() - t
        rows = []
        for r in range(args.tp):
            with open(os.path.join(work, f"rank{r}.json")) as f:
                rows.append(json.load(f))
        print(f"\nimport at TP {args.tp}: {wall:.0f} s wall for the launch (process start, "
              f"imports, build, load, checkpoint save)\n")  # fmt: skip
        head = ("rank", "share MB", "base MB", "load s", "peak load MB", "peak/share",
                "(peak-base)/share", "save s", "peak save MB", "peak/share",
                "(peak-base)/share")  # fmt: skip
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            share, base = row["share_mb"], row["baseline_mb"]
            cells = [row["rank"], f"{share:.0f}", f"{base:.0f}"]
            for phase, peak in (("load", row["peak_load_mb"]), ("save", row["peak_total_mb"])):
                cells += [f"{row[phase + '_s']:.1f}", f"{peak:.0f}", f"{peak / share:.2f}",
                          f"{(peak - base) / share:.2f}"]  # fmt: skip
            print("| " + " | ".join(str(c) for c in cells) + " |")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
