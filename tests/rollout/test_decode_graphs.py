"""Static-shape decode steps (``rollout.decode_graphs.DecodeGraphs``): the logits and the cache
equal ``FastDecoder.decode_rows`` at the live shapes while the live rows and key lengths move
through several row and length buckets (padding rows included); a failed capture falls back to
the live shapes with a warning. Generation with ``decode_graphs=True`` (CUDA graphs on a GPU) is
checked against the other decoders in tests/rollout/test_generate.py (TP 1 / 2, PP 2) and, on a
GPU, tests/rollout/test_cuda.py; this file runs at TP 1 and 2 over gloo."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.dist import run_distributed
from tests.rollout.test_fast_decode import VOCAB, _model

ROWS, TOTAL = 7, 24


def _prefilled(model, tokens, lens):
    """A FastDecoder of ROWS x TOTAL with prompts [ROWS, s] of lengths ``lens`` prefilled."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.rollout.fast_decode import FastDecoder

    fast = FastDecoder(model, ROWS, TOTAL, ps.get_tensor_model_parallel_group())
    fast.prefill_rows(tokens[:, : int(lens.max())], lens, torch.arange(ROWS, device=lens.device))
    return fast


def static_worker(rank, world, capture=False):
    from megatron_eaopd.parallel.init import compute_device
    from megatron_eaopd.rollout.decode_graphs import DecodeGraphs

    model = _model(world, "rms_qk")
    dev = compute_device()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, VOCAB, (ROWS, TOTAL), generator=gen).to(dev)
    lens = torch.tensor([2, 5, 3, 9, 4, 6, 1], device=dev)
    out = {"shapes": set(), "err": 0.0, "cache_err": 0.0, "scale": 0.0, "pad_writes_ok": True}
    with torch.no_grad():
        live, static = _prefilled(model, tokens, lens), _prefilled(model, tokens, lens)
        graphs = DecodeGraphs(static, row_multiple=3, length_bucket=5, capture=capture)
        pos = lens.clone()
        # the live rows shrink as a compacting decoder's do (rows [0, n) stay live)
        for n in (7, 7, 6, 6, 5, 4, 4, 2, 1, 1, 1):
            p = pos[:n]
            end = int(p.max()) + 1
            before = static.k[:, n:].clone()
            got = graphs(tokens[torch.arange(n, device=dev), p], p, end)
            ref = live.decode_rows(tokens[torch.arange(n, device=dev), p], p, end)
            out["shapes"].add(graphs.shape(n, end))
            out["err"] = max(out["err"], float((got - ref).abs().max()))
            out["scale"] = max(out["scale"], float(ref.abs().max()))
            for cache_s, cache_l in ((static.k, live.k), (static.v, live.v)):
                diff = (cache_s[:, :n, :, :end] - cache_l[:, :n, :, :end]).abs().max()
                out["cache_err"] = max(out["cache_err"], float(diff))
            # padding rows write position 0 of rows [n, R) only: nothing else there changes
            changed = (static.k[:, n:] != before).any(dim=(0, 2, 4))  # [rows - n, TOTAL]
            out["pad_writes_ok"] &= not bool(changed[:, 1:].any())
            rows, _ = graphs.shape(n, end)
            out["pad_writes_ok"] &= not bool(changed[rows - n :].any())
            pos = pos + 1
        out["counters"] = dict(graphs.counters)
    return out


def check_static(res: dict, captured: bool = False) -> None:
    """The static steps' logits and cache equal the live ones (fp32, to rounding: another
    attention kernel may sum in another order), every bucket was met."""
    assert res["scale"] > 1.0, res  # the logits are not trivially small
    assert res["err"] < 2e-5 * res["scale"] and res["cache_err"] < 1e-5, res
    assert res["pad_writes_ok"], res
    # the steps went through several row and key-length buckets, padded rows included
    rows = {r for r, _ in res["shapes"]}
    lengths = {L for _, L in res["shapes"]}
    assert rows == {7, 6, 3}, res["shapes"]
    assert len(lengths) >= 3 and max(lengths) <= TOTAL, res["shapes"]
    assert all(L % 5 == 0 or L == TOTAL for L in lengths), res["shapes"]
    if captured:  # one graph per (rows, length) shape met, replayed at every step
        counts = {"captures": len(res["shapes"]), "replays": 11, "eager": 0}
    else:
        counts = {"captures": 0, "replays": 0, "eager": 11}
    assert res["counters"] == counts, res["counters"]


@pytest.mark.parametrize("tp", [1, 2])
def test_static_shapes_equal_live_shapes(tp):
    for res in run_distributed(static_worker, tp, timeout=300):
        check_static(res)


def _failed_capture_worker(rank, world):
    from megatron_eaopd.parallel.init import compute_device
    from megatron_eaopd.rollout.decode_graphs import DecodeGraphs

    model = _model(world, "rms_qk")
    dev = compute_device()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, VOCAB, (ROWS, TOTAL), generator=gen).to(dev)
    lens = torch.full((ROWS,), 3, device=dev)
    with torch.no_grad():
        live, static = _prefilled(model, tokens, lens), _prefilled(model, tokens, lens)
        graphs = DecodeGraphs(static, capture=True)  # on the CPU capture fails: no CUDA
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [graphs(tokens[:, 3 + i], 3 + i, 4 + i) for i in range(2)]
        ref = [live.decode_rows(tokens[:, 3 + i], lens + i, 4 + i) for i in range(2)]
    return dict(
        err=max(float((g - r).abs().max()) for g, r in zip(got, ref)),
        warnings=[str(w.message) for w in caught],
        broken=graphs.broken,
        counters=dict(graphs.counters),
    )


def test_failed_capture_falls_back_to_live_shapes_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("capture works on a CUDA device")
    (res,) = run_distributed(_failed_capture_worker, 1, timeout=300)
    assert res["err"] == 0.0, res  # the live-shape step itself, not a static one
    assert res["broken"] and res["counters"] == {"captures": 0, "replays": 0, "eager": 2}
    assert len(res["warnings"]) == 1 and "capture" in res["warnings"][0], res["warnings"]


def test_bad_buckets_are_refused():
    from megatron_eaopd.rollout.decode_graphs import DecodeGraphs

    class _Fast:
        k = torch.zeros(1, 4, 1, 8, 2)

    with pytest.raises(ValueError, match="row_multiple and length_bucket must be >= 1"):
        DecodeGraphs(_Fast(), row_multiple=0)
    graphs = DecodeGraphs(_Fast(), row_multiple=3, length_bucket=5)
    assert graphs.shape(1, 1) == (3, 5) and graphs.shape(4, 6) == (4, 8)  # capped at the cache
