"""Calibrate FastDecoder's first-step check: how far its logits are from megatron's forward.

FastDecoder's first (prefill) logits are compared with megatron's forward of the same rows
(``continuous.logits_match``); a mismatch sends rollouts to megatron's forward. This prints, for
bf16 and fp32 parameters, the relative difference max |FastDecoder - megatron| / max |megatron|
of the last position's logits (4 rows of 24 random tokens, 2 draws; the larger is shown) for the
unmodified FastDecoder and for planted bugs, and whether the check accepts each:

- ``none``: FastDecoder as shipped (bf16: rounding only);
- ``no RoPE``: queries and keys not rotated;
- ``RoPE -1``: the rotation of the previous position (an off-by-one);
- ``scale x1.25``: a wrong attention softmax scale;
- ``no final norm``: the output layer on the un-normalised hidden states.

Models: the tests' 2-layer model (tests/rollout/test_fast_decode.py's builder: hidden 32, N(0, 0.3),
norm gains and eps away from 1 and 0) and the Qwen3-1.7B width (2048 hidden, 16 / 8 heads of
128, ffn 6144, its 151,936 vocabulary, tied) at each of ``--layers`` depths with N(0, 0.02)
weights and unit gains. For bf16, the fp32 forward of the same (bf16-rounded) weights is also
compared with both bf16 forwards (``vs fp32``: FastDecoder / megatron).

    python benchmarks/bench_first_step_check.py
    python benchmarks/bench_first_step_check.py --layers 2 8 28
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys

import torch
import torch.distributed as dist

BUGS = ("none", "no RoPE", "RoPE -1", "scale x1.25", "no final norm")


def _model(kind: str, layers: int, dtype: str):
    """(model, vocabulary): the Qwen3-1.7B width at ``layers`` with N(0, 0.02) weights, or the
    tests' 2-layer model (``tests/rollout/test_fast_decode.py``'s own builder)."""
    if kind == "test":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.rollout.test_fast_decode import VOCAB
        from tests.rollout.test_fast_decode import _model as tests_model

        return tests_model(1, "rms_qk_bf16" if dtype == "bfloat16" else "rms_qk"), VOCAB
    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.config import QWEN3_1_7B

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_rollout_gpu import random_init

    cfg = dataclasses.replace(QWEN3_1_7B, num_layers=layers, max_sequence_length=64,
                              params_dtype=dtype)  # fmt: skip
    (m,) = build_model(cfg)
    random_init(m, 3)
    return m.eval(), cfg.vocab_size


def _planted(bug: str):
    """Patch FastDecoder with ``bug``; returns the undo function."""
    from megatron_eaopd.rollout.fast_decode import FastDecoder

    rope, logits, init = FastDecoder._rope, FastDecoder._logits, FastDecoder.__init__
    if bug == "no RoPE":
        FastDecoder._rope = lambda self, x, cos, sin: x
    elif bug == "RoPE -1":
        FastDecoder._rope = lambda self, x, cos, sin: rope(
            self, x, torch.roll(cos, 1, 0), torch.roll(sin, 1, 0)
        )
    elif bug == "no final norm":
        FastDecoder._logits = lambda self, last: self._matmul(last, self._output_weight())
    elif bug == "scale x1.25":

        def scaled(self, *a, **k):
            init(self, *a, **k)
            self.scale *= 1.25

        FastDecoder.__init__ = scaled

    def undo():
        FastDecoder._rope, FastDecoder._logits, FastDecoder.__init__ = rope, logits, init

    return undo


def _measure(kind: str, layers: int) -> list[dict]:
    from megatron.core import parallel_state as ps

    from megatron_eaopd.rollout.continuous import logits_match
    from megatron_eaopd.rollout.fast_decode import FastDecoder
    from megatron_eaopd.rollout.generate import _vocab_parallel_output

    group = ps.get_tensor_model_parallel_group()
    models = {dtype: _model(kind, layers, dtype) for dtype in ("bfloat16", "float32")}
    (mb, vocab), (mf, _) = models["bfloat16"], models["float32"]
    with torch.no_grad():  # the fp32 model gets the bf16 model's (rounded) weights
        for pf, pb in zip(mf.parameters(), mb.parameters(), strict=True):
            pf.copy_(pb.float())
    rows = []
    for dtype, (model, _) in models.items():
        rel = {bug: 0.0 for bug in BUGS}
        ok = {bug: True for bug in BUGS}
        vs32 = [0.0, 0.0]
        elementwise = True  # the rule before: allclose(atol=rtol=5e-2) (fp32: 1e-4, unchanged)
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            tokens = torch.randint(1, vocab, (4, 24), generator=gen)
            pos = torch.arange(24).expand_as(tokens)
            with torch.no_grad():
                with _vocab_parallel_output(model):
                    ref = model(tokens, pos, None, runtime_gather_output=True)[:, -1]
                with _vocab_parallel_output(mf):
                    ref32 = mf(tokens, pos, None, runtime_gather_output=True)[:, -1].float()
                for bug in BUGS:
                    undo = _planted(bug)
                    try:
                        got = FastDecoder(model, 4, 24, group).forward(tokens, 0)
                    finally:
                        undo()
                    diff = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
                    rel[bug] = max(rel[bug], diff)
                    ok[bug] = ok[bug] and logits_match(got, ref, group)
                    if bug == "none" and dtype == "bfloat16":
                        elementwise = elementwise and torch.allclose(
                            got.float(), ref.float(), atol=5e-2, rtol=5e-2
                        )
                        scale = float(ref32.abs().max())
                        vs32[0] = max(vs32[0], float((got.float() - ref32).abs().max()) / scale)
                        vs32[1] = max(vs32[1], float((ref.float() - ref32).abs().max()) / scale)
        rows.append(dict(kind=kind, layers=layers, dtype=dtype, rel=rel, ok=ok,
                         vs32=vs32 if dtype == "bfloat16" else None,
                         elementwise=elementwise if dtype == "bfloat16" else None))  # fmt: skip
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 28],
                   help="depths of the Qwen3-1.7B-width model")  # fmt: skip
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron_eaopd.parallel.init import initialize_parallel
    from megatron_eaopd.rollout.continuous import LOW_PRECISION_TOL

    initialize_parallel(1, 1, seed=1)
    rows = _measure("test", 2)
    for layers in args.layers:
        rows += _measure("qwen", layers)
    print(f"\n### max |FastDecoder - megatron| / max |megatron| of the first logits; the check "
          f"(bf16: <= {LOW_PRECISION_TOL}; fp32: allclose 1e-4) accepts: yes / NO\n")  # fmt: skip
    print("| model | dtype | " + " | ".join(BUGS) + " | vs fp32 (ours / megatron) | "
          "none, by the elementwise 5e-2 rule used before |")  # fmt: skip
    print("|---|---|" + "---|" * (len(BUGS) + 2))
    for r in rows:
        name = (
            "tests' model, 2 layers"
            if r["kind"] == "test"
            else f"Qwen3-1.7B width, {r['layers']} layers"
        )
        cells = [f"{r['rel'][b]:.4f} {'yes' if r['ok'][b] else 'NO'}" for b in BUGS]
        vs = f"{r['vs32'][0]:.4f} / {r['vs32'][1]:.4f}" if r["vs32"] else "-"
        old = "-" if r["elementwise"] is None else ("yes" if r["elementwise"] else "NO")
        print(f"| {name} | {r['dtype']} | " + " | ".join(cells) + f" | {vs} | {old} |")
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
