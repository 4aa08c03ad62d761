"""Rollout draws of this checkout against another checkout: are tokens, log-probs and entropies
the same bit for bit? (A check for changes to the sampler or FastDecoder meant to change only
speed.)

For each checkout and each TP size, a fresh set of gloo processes imports ``megatron_eaopd``
from that checkout and runs ``generate`` on a small Qwen3-shaped model (2 x 64, the same
weights at every TP size: ``init_weights_layout_invariant``) over the settings in ``CASES``:
blocked and per-column plain draws (vocabulary 4096 and 1000), temperatures, a log-prob
temperature, top-k, top-p, chunks, continuous batching and compaction, with an EOS that ends
some rows early. Printed: per TP size and setting, whether the two checkouts agree.

    git worktree add /tmp/old HEAD~1
    python benchmarks/compare_draws.py --other /tmp/old            # TP 1 and 2
    EAOPD_COMPILE=0 python benchmarks/compare_draws.py --other /tmp/old --tp 1
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import torch

# (vocabulary, SamplingParams kwargs, generate kwargs)
CASES = [
    (4096, {}, {}),
    (4096, {"temperature": 0.8}, {}),
    (4096, {"temperature": 1.0, "logprob_temperature": 0.7}, {}),
    (1000, {}, {}),
    (1000, {"temperature": 0.7}, {}),
    (4096, {"top_k": 20}, {}),
    (4096, {"top_p": 0.9}, {}),
    (4096, {}, {"max_batch": 5}),
    (1000, {}, {"max_batch": 5, "continuous": False}),
    (4096, {}, {"compact_frac": 0.1}),
]
EOS, ROWS, NEW = 5, 11, 24


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import bench_rollout  # this checkout's; it imports megatron_eaopd when called: the other's
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eaopd.rollout import SamplingParams, generate

    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for vocab, sampling, kwargs in CASES:
        shape = argparse.Namespace(layers=2, hidden=64, heads=4, vocab=vocab, prompt=6, new=NEW)
        model, _ = bench_rollout._model(shape, world)  # the same weights at every TP size
        with torch.no_grad():  # peaked, and EOS likely enough that some rows end early
            w = model.output_layer.weight  # this rank's rows [start, start + w.shape[0])
            w.mul_(8.0)
            start = w.shape[0] * ps.get_tensor_model_parallel_rank()
            if start <= EOS < start + w.shape[0]:
                w[EOS - start] *= 3
        gen = torch.Generator().manual_seed(0)
        prompts = [[1] + torch.randint(3, vocab, (2 + i % 4,), generator=gen).tolist()
                   for i in range(ROWS)]  # fmt: skip
        batch = generate(model, prompts, max_new_tokens=NEW, eos_id=EOS, pad_id=0,
                       vocab_size=vocab, params=SamplingParams(**sampling),
                       generator=torch.Generator().manual_seed(7), **kwargs)  # fmt: skip
        results.append((batch.tokens, batch.logprobs, batch.entropies))
        ps.destroy_model_parallel()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _child(tp: int, out: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(tp, port, out), nprocs=tp)


def _run(checkout: str, tp: int, out: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")]))
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
        f"import megatron_eaopd; assert megatron_eaopd.__file__.startswith({checkout!r}), "
        f"megatron_eaopd.__file__; import compare_draws; compare_draws._child({tp}, {out!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{checkout} at TP {tp} failed:\n{proc.stderr[-3000:]}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal in shape and values, NaNs in the same places counted equal."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        )
    return bool(torch.equal(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="another checkout of the project")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4])
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = os.path.abspath(args.other)
    differ = 0
    print("| TP | setting | tokens | log-probs | entropies |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            res = []
            for name, checkout in (("this", here), ("other", other)):
                path = os.path.join(tmp, f"{name}{tp}.pt")
                _run(checkout, tp, path)
                res.append(torch.load(path))
            for (vocab, sampling, kwargs), a, b in zip(CASES, *res):
                same = [_same(x, y) for x, y in zip(a, b)]
                differ += not all(same)
                setting = f"V {vocab} {sampling or ''} {kwargs or ''}".strip()
                print(f"| {tp} | {setting} | " + " | ".join("same" if s else "DIFFER"
                                                           for s in same) + " |")  # fmt: skip
    print(f"\n{differ} of {len(CASES) * len(args.tp)} settings differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
