"""Benchmark rollouts: ours against transformers' ``generate``, compaction, and TP communication.

Sections (``--sections``, default ``hf comm``), each printed as a table:

- ``hf``: one process, one torch thread, a Qwen3-shaped model (``--layers`` x ``--hidden``, GQA,
  QK-norm, untied, ``--vocab``) with random weights; the same weights exported to a Hugging Face
  folder and loaded as ``Qwen3ForCausalLM``. Both sample with temperature 1, top-k off, top-p 1
  (transformers: ``do_sample=True, top_k=0, top_p=1.0``) from ``--batch`` prompts of
  ``--prompt`` tokens, ``--new`` new tokens. Workloads: ``uniform`` (EOS off: every sequence
  decodes ``--new`` tokens) and ``skewed`` (the EOS row of the output layer is scaled so that a
  few per cent of the mass goes to EOS: most responses end early, a few run to the limit); on
  ``skewed`` ours runs with and without batch compaction. Calls alternate between the decoders;
  the best of ``--reps`` is reported, as wall time and as process CPU time (the machine is shared:
  CPU time is what a loaded machine distorts least). tokens/s = generated tokens / time; rows
  decoded = rows run through the model summed over steps (transformers keeps finished rows).
- ``comm``: TP 2 (two gloo processes), the same shape at vocabularies ``--comm-vocab``; every
  torch.distributed call is wrapped and the elements of its output buffers counted; per generated
  token: the sampler's elements and all elements (the model's TP all-reduces included).
- ``kv``: our KV-cache decoding against re-running the prefix (``use_kv_cache=False``).
- ``continuous``: many prompts (``--cb-prompts``, uneven lengths 8 to ``--prompt`` tokens) decoded
  at most ``--cb-max-batch`` at once on the ``skewed`` workload (up to ``--new`` tokens):
  continuous batching (freed rows refilled with waiting prompts), chunks of ``--cb-max-batch``
  with compaction, and transformers' ``generate`` on the same chunks; ours all at once
  (compaction) for reference. Our variants give identical tokens (checked). Same timing rules.

    python benchmarks/bench_rollout.py
    python benchmarks/bench_rollout.py --sections hf --reps 5 --batch 32 --new 128
- ``pp``: PP 2 (two gloo processes, one torch thread each), the ``hf`` shape and uniform
  workload: ``generate`` with FastDecoder on both stages against megatron's forward with its
  ``StaticInferenceContext`` (``fast_decode=False``); wall time, calls alternating, best of
  ``--reps`` after a warm-up, and whether the tokens are identical.

    python benchmarks/bench_rollout.py --sections continuous
    python benchmarks/bench_rollout.py --sections pp
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EOS = 2


def _model(args, tp, vocab=None, pp=1):
    from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, pp, seed=1)
    cfg = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=max(1, args.heads // 2), kv_channels=args.hidden // args.heads,
        ffn_hidden_size=3 * args.hidden, vocab_size=vocab or args.vocab, qk_layernorm=True,
        max_sequence_length=args.prompt + args.new, make_vocab_size_divisible_by=8,
        untie_embeddings_and_output_weights=True, rotary_base=1000000.0,
        params_dtype=getattr(args, "params_dtype", "float32"),
    )  # fmt: skip
    (model,) = build_model(cfg)
    init_weights_layout_invariant([model], 0)
    return model, cfg


def _prompts(args, vocab):
    gen = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, vocab, (args.prompt - 1,), generator=gen).tolist()
            for _ in range(args.batch)]  # fmt: skip


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


# --------------------------------------------------------------------------- hf section


def _hf_worker(rank, port, args, out_path):
    _init(rank, 1, port)
    from transformers import AutoModelForCausalLM

    from megatron_eaopd.models.hf import save_hf_weights
    from megatron_eaopd.rollout import SamplingParams, generate

    model, cfg = _model(args, 1)
    prompts = _prompts(args, args.vocab)
    ids = torch.tensor(prompts)
    rows = []
    for workload in ("uniform", "skewed"):
        if workload == "skewed":  # a few per cent of the mass on EOS: skewed lengths
            with torch.no_grad():
                model.output_layer.weight[EOS] *= args.eos_scale
        with tempfile.TemporaryDirectory() as hf_dir:
            save_hf_weights([model], hf_dir, model_config=cfg, dtype="fp32", overwrite=True,
                            token_ids={"bos_token_id": 1, "eos_token_id": EOS,
                                       "pad_token_id": 0})  # fmt: skip
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        eos = EOS if workload == "skewed" else None
        hf.generation_config.eos_token_id = eos

        def ours(compact, eos=eos):
            stats = {}
            out = generate(
                model, prompts, max_new_tokens=args.new, eos_id=-1 if eos is None else eos,
                pad_id=0, vocab_size=args.vocab, params=SamplingParams(),
                generator=torch.Generator().manual_seed(1),
                compact_frac=0.25 if compact else None, stats=stats,
            )  # fmt: skip
            out.decode_rows = stats["decode_rows"]
            return out

        def theirs(eos=eos, hf=hf):
            torch.manual_seed(1)
            with torch.no_grad():
                return hf.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new,
                    eos_token_id=eos, pad_token_id=0,
                )  # fmt: skip

        variants = {"ours": lambda: ours(True), "transformers": theirs}
        if workload == "skewed":
            variants["ours, no compaction"] = lambda: ours(False)
        best = {k: [float("inf"), float("inf"), 0, 0] for k in variants}
        for _ in range(args.reps + 1):  # the first round is a warm-up
            for name, fn in variants.items():
                out, wall, cpu = _timed(fn)
                if isinstance(out, torch.Tensor):  # transformers: count up to EOS
                    resp = out[:, ids.shape[1] :]
                    hit = (resp == EOS).cumsum(1) if eos is not None else torch.zeros_like(resp)
                    n_tok = int(((hit == 0) | ((hit == 1) & (resp == EOS))).sum())
                    rows_run = resp.shape[0] * resp.shape[1]  # no row ever leaves the batch
                else:
                    n_tok, rows_run = int(out.response_lens.sum()), out.decode_rows
                b = best[name]
                b[2], b[3] = n_tok, rows_run
                b[0], b[1] = min(b[0], wall), min(b[1], cpu)
        for name, (wall, cpu, n_tok, rows_run) in best.items():
            rows.append(dict(workload=workload, name=name, wall=wall, cpu=cpu, tokens=n_tok,
                             rows_run=rows_run))  # fmt: skip
    torch.save(rows, out_path)
    dist.destroy_process_group()


def _print_hf(rows, args):
    print(f"\n### ours vs transformers: batch {args.batch}, prompt {args.prompt}, up to {args.new} "
          f"new tokens, {args.layers} x {args.hidden} Qwen3-shaped, vocab {args.vocab}, "
          f"1 thread; best of {args.reps}\n")  # fmt: skip
    print("| workload | decoder | tokens | rows decoded | wall (s) | tokens/s (wall) | CPU (s) | "
          "tokens/s (CPU) | x transformers (CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    ref = {r["workload"]: r for r in rows if r["name"] == "transformers"}
    for r in rows:
        base = ref[r["workload"]]
        speed = (r["tokens"] / r["cpu"]) / (base["tokens"] / base["cpu"])
        print(f"| {r['workload']} | {r['name']} | {r['tokens']} | {r['rows_run']} | "
              f"{r['wall']:.2f} | "
              f"{r['tokens'] / r['wall']:.0f} | {r['cpu']:.2f} | {r['tokens'] / r['cpu']:.0f} | "
              f"{speed:.2f}x |")  # fmt: skip


# --------------------------------------------------------------------------- continuous section


def _hf_copy(model, cfg, eos):
    """Our weights as transformers' Qwen3ForCausalLM (eval), EOS id ``eos`` (None: off)."""
    from transformers import AutoModelForCausalLM

    from megatron_eaopd.models.hf import save_hf_weights

    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf_weights([model], hf_dir, model_config=cfg, dtype="fp32", overwrite=True,
                        token_ids={"bos_token_id": 1, "eos_token_id": EOS,
                                   "pad_token_id": 0})  # fmt: skip
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = eos
    return hf


def _cb_worker(rank, port, args, out_path):
    _init(rank, 1, port)
    from megatron_eaopd.rollout import SamplingParams, generate

    model, cfg = _model(args, 1)
    with torch.no_grad():  # the skewed workload
        model.output_layer.weight[EOS] *= args.eos_scale
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(8, args.prompt + 1, (args.cb_prompts,), generator=gen).tolist()
    prompts = [[1] + torch.randint(3, args.vocab, (n - 1,), generator=gen).tolist() for n in lens]
    hf = _hf_copy(model, cfg, EOS)
    m = args.cb_max_batch

    def ours(**kw):
        stats = {}
        out = generate(model, prompts, max_new_tokens=args.new, eos_id=EOS, pad_id=0,
                       vocab_size=args.vocab, params=SamplingParams(), stats=stats,
                       generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
        return out, int(out.response_lens.sum()), stats["decode_rows"]

    def theirs():  # transformers' generate on the same chunks (left-padded, as it needs)
        torch.manual_seed(1)
        n_tok = rows_run = 0
        for start in range(0, len(prompts), m):
            chunk = prompts[start : start + m]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = (torch.arange(width)[None] >= width - torch.tensor([len(p) for p in chunk])[
                :, None]).long()  # fmt: skip
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new,
                                  eos_token_id=EOS, pad_token_id=0)  # fmt: skip
            resp = out[:, width:]
            hit = (resp == EOS).cumsum(1)
            n_tok += int(((hit == 0) | ((hit == 1) & (resp == EOS))).sum())
            rows_run += resp.shape[0] * resp.shape[1]
        return None, n_tok, rows_run

    variants = {
        f"ours, continuous (max_batch {m}, refill each free row)": lambda: ours(max_batch=m),
        f"ours, continuous (max_batch {m}, refill at 1/4 free)": lambda: ours(
            max_batch=m, refill_frac=0.25
        ),
        f"ours, chunks of {m}, compaction": lambda: ours(max_batch=m, continuous=False),
        f"ours, chunks of {m}, no compaction": lambda: ours(max_batch=m, continuous=False,
                                                          compact_frac=None),
        f"transformers, chunks of {m}": theirs,
        f"ours, all {len(prompts)} at once, compaction": lambda: ours(),
    }  # fmt: skip
    best = {k: [float("inf"), float("inf"), 0, 0] for k in variants}
    tokens = None
    for _ in range(args.reps + 1):  # the first round is a warm-up
        for name, fn in variants.items():
            (out, n_tok, rows_run), wall, cpu = _timed(fn)
            if out is not None:  # ours: identical tokens however the prompts are batched
                if tokens is None:
                    tokens = out.tokens
                assert torch.equal(out.tokens, tokens), name
            b = best[name]
            b[0], b[1], b[2], b[3] = min(b[0], wall), min(b[1], cpu), n_tok, rows_run
    rows = [dict(workload="skewed", name=name, wall=w, cpu=c, tokens=t, rows_run=r)
            for name, (w, c, t, r) in best.items()]  # fmt: skip
    torch.save(rows, out_path)
    dist.destroy_process_group()


def _print_cb(rows, args):
    print(f"\n### continuous batching: {args.cb_prompts} prompts of 8-{args.prompt} tokens, at "
          f"most {args.cb_max_batch} decoded at once, skewed workload (EOS row x "
          f"{args.eos_scale}), up to {args.new} new tokens, {args.layers} x {args.hidden} "
          f"Qwen3-shaped, vocab {args.vocab}, 1 thread; best of {args.reps}\n")  # fmt: skip
    print("| decoder | tokens | rows decoded | wall (s) | CPU (s) | tokens/s (CPU) | "
          "x transformers (CPU) | x chunks + compaction (CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = next(r for r in rows if r["name"].startswith("transformers"))
    chunks = next(r for r in rows if "compaction" in r["name"] and "chunks" in r["name"]
                  and "no compaction" not in r["name"])  # fmt: skip
    for r in rows:
        speed = r["tokens"] / r["cpu"]
        print(f"| {r['name']} | {r['tokens']} | {r['rows_run']} | {r['wall']:.2f} | "
              f"{r['cpu']:.2f} | {speed:.0f} | {speed / (base['tokens'] / base['cpu']):.2f}x | "
              f"{speed / (chunks['tokens'] / chunks['cpu']):.2f}x |")  # fmt: skip


# --------------------------------------------------------------------------- comm section


def _count_collectives(counter: dict):
    """Wrap torch.distributed's collectives: counter['elements'] += elements of the outputs."""

    def wrap(name, size_of):
        fn = getattr(dist, name, None)
        if fn is None:
            return

        def wrapped(*a, **kw):
            counter["elements"] += size_of(*a, **kw)
            counter["calls"] += 1
            return fn(*a, **kw)

        setattr(dist, name, wrapped)

    wrap("all_gather", lambda out, *a, **k: sum(t.numel() for t in out))
    wrap("all_gather_into_tensor", lambda out, *a, **k: out.numel())
    wrap("all_gather_single", lambda out, *a, **k: out.numel())
    for name in ("all_reduce", "broadcast", "send", "recv", "reduce_scatter_tensor"):
        wrap(name, lambda t, *a, **k: t.numel())


def _comm_worker(rank, port, args, out_path):
    _init(rank, 2, port)
    from megatron_eaopd.rollout import SamplingParams, generate

    counter = {"elements": 0, "calls": 0}
    _count_collectives(counter)
    rows = []
    for vocab in args.comm_vocab:
        model, _ = _model(args, 2, vocab)
        prompts = _prompts(args, vocab)[: args.comm_batch]
        for params in (SamplingParams(), SamplingParams(top_k=20, top_p=0.9)):
            stats = {}
            counter.update(elements=0, calls=0)
            out = generate(model, prompts, max_new_tokens=args.comm_new, eos_id=-1, pad_id=0,
                           vocab_size=vocab, params=params, stats=stats,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
            n_tok = int(out.response_lens.sum())
            rows.append(dict(vocab=vocab, params="T=1" if not params.filtered else
                             "top-k 20, top-p 0.9", sampler=stats["sample_elements"] / n_tok,
                             total=counter["elements"] / n_tok, fallbacks=stats["fallbacks"],
                             steps=stats["steps"]))  # fmt: skip
    if rank == 0:
        torch.save(rows, out_path)
    dist.destroy_process_group()


def _print_comm(rows, args):
    print(f"\n### TP 2 communication per generated token (batch {args.comm_batch}, "
          f"{args.comm_new} new tokens, elements of collective outputs on rank 0)\n")  # fmt: skip
    print("| vocab | sampling | sampler elements / token | all elements / token "
          "(model all-reduces incl.) | fallback steps / steps |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']} | {r['params']} | {r['sampler']:.1f} | {r['total']:.1f} | "
              f"{r['fallbacks']} / {r['steps']} |")  # fmt: skip


# --------------------------------------------------------------------------- kv section


def _kv_worker(rank, port, args, out_path):
    _init(rank, 1, port)
    from megatron_eaopd.rollout import SamplingParams, generate

    model, _ = _model(args, 1)
    prompts = _prompts(args, args.vocab)
    times = {}
    for kv in (True, False):
        best = float("inf")
        for _ in range(args.reps):
            _, _, cpu = _timed(lambda kv=kv: generate(
                model, prompts, max_new_tokens=args.new, eos_id=-1, pad_id=0,
                vocab_size=args.vocab, params=SamplingParams(), use_kv_cache=kv,
                generator=torch.Generator().manual_seed(1)))  # fmt: skip
            best = min(best, cpu)
        times[kv] = best
    torch.save(times, out_path)
    dist.destroy_process_group()


def _print_kv(times, args):
    print(f"\n### KV cache vs recompute (CPU s, best of {args.reps})\n")
    print("| KV cache | recompute | speed-up |\n|---|---|---|")
    print(f"| {times[True]:.2f} | {times[False]:.2f} | {times[False] / times[True]:.1f}x |")


_PP_VARIANTS = {  # name -> generate kwargs
    "FastDecoder, interleaved groups": dict(fast_decode=True, pp_interleave=True),
    "FastDecoder, one batch": dict(fast_decode=True, pp_interleave=False),
    "megatron's forward": dict(fast_decode=False),
}


def _pp_worker(rank, port, args, out_path):
    _init(rank, 2, port)
    from megatron_eaopd.rollout import SamplingParams, generate

    model, _ = _model(args, 1, pp=2)
    prompts = _prompts(args, args.vocab)
    best, tokens = dict.fromkeys(_PP_VARIANTS, float("inf")), {}
    for i in range(args.reps + 1):  # the first round is a warm-up
        for name, kw in _PP_VARIANTS.items():
            stats = {}
            out, wall, _ = _timed(lambda kw=kw, stats=stats: generate(
                model, prompts, max_new_tokens=args.new, eos_id=-1, pad_id=0,
                vocab_size=args.vocab, params=SamplingParams(), stats=stats,
                generator=torch.Generator().manual_seed(1), **kw))  # fmt: skip
            assert stats["fast"] == int(kw["fast_decode"])
            assert stats["interleaved"] == int(kw.get("pp_interleave", False))
            if i:
                best[name] = min(best[name], wall)
            tokens[name] = out.tokens
    if rank == 0:
        ref = tokens["megatron's forward"]
        same = {k: torch.equal(v, ref) for k, v in tokens.items()}
        torch.save(dict(best=best, same=same), out_path)
    dist.destroy_process_group()


def _print_pp(res, args):
    print(
        f"\n### PP 2 (two processes, one layer half each; batch {args.batch}, {args.new} new "
        f"tokens, uniform workload): wall s, best of {args.reps}\n"
    )
    print("| decoder | wall (s) | speed-up vs megatron's forward | tokens as megatron's |\n"
          "|---|---|---|---|")  # fmt: skip
    ref = res["best"]["megatron's forward"]
    for name, wall in res["best"].items():
        print(f"| {name} | {wall:.2f} | {ref / wall:.2f}x | {res['same'][name]} |")


def _launch(worker, nprocs, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(worker, args=(port, args, out), nprocs=nprocs, start_method="spawn")
        return torch.load(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sections",
        nargs="+",
        default=["hf", "comm"],
        choices=["hf", "comm", "kv", "continuous", "pp"],
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--eos-scale",
        type=float,
        default=60.0,
        help="skewed workload: factor on the EOS row of the output layer",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cb-prompts", type=int, default=128)
    p.add_argument("--cb-max-batch", type=int, default=32)
    p.add_argument("--comm-vocab", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--comm-batch", type=int, default=8)
    p.add_argument("--comm-new", type=int, default=16)
    args = p.parse_args()
    if "hf" in args.sections:
        _print_hf(_launch(_hf_worker, 1, args), args)
    if "comm" in args.sections:
        _print_comm(_launch(_comm_worker, 2, args), args)
    if "kv" in args.sections:
        _print_kv(_launch(_kv_worker, 1, args), args)
    if "continuous" in args.sections:
        _print_cb(_launch(_cb_worker, 1, args), args)
    if "pp" in args.sections:
        _print_pp(_launch(_pp_worker, 2, args), args)


if __name__ == "__main__":
    main()
