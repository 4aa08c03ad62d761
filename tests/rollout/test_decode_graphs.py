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


def _fake_recorder(kind, rank, world):
    """A stand-in for ``DecodeGraphs._record`` on the CPU: the "graph" re-runs the captured
    function, after filling the whole output buffer with NaN (what another shape's replay
    could leave there); "raise": fails on the last rank only; "wrong": its replay adds 1."""

    def record(self, fn):
        if kind == "raise" and rank == world - 1:
            raise RuntimeError("planted capture failure")

        def replay():
            self.out.fill_(float("nan"))
            fn()
            if kind == "wrong":
                self.out.add_(1.0)

        return replay

    return record


def static_worker(rank, world, capture=False, fake=None):
    from megatron_eaopd.parallel.init import compute_device
    from megatron_eaopd.rollout.decode_graphs import DecodeGraphs

    if fake is not None:
        DecodeGraphs._record = _fake_recorder(fake, rank, world)
    model = _model(world, "rms_qk")
    dev = compute_device()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, VOCAB, (ROWS, TOTAL), generator=gen).to(dev)
    lens = torch.tensor([2, 5, 3, 9, 4, 6, 1], device=dev)
    out = {"shapes": set(), "err": 0.0, "cache_err": 0.0, "scale": 0.0, "pad_writes_ok": True,
           "run_at": set(), "padded_steps": 0}  # fmt: skip
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        live, static = _prefilled(model, tokens, lens), _prefilled(model, tokens, lens)
        graphs = DecodeGraphs(static, row_multiple=3, length_bucket=5,
                              capture=capture or fake is not None)  # fmt: skip
        run_rows = static.decode_rows

        def recorded(tok, pos, end=None):  # the shapes the decoder's steps really run at
            out["run_at"].add((tok.shape[0], end))
            return run_rows(tok, pos, end)

        static.decode_rows = recorded
        # the keys of token 0 at position 0 (what a padding row writes), from a prefill
        k0 = _prefilled(model, torch.zeros_like(tokens), torch.ones_like(lens)).k[:, 0, :, 0]
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
            if rows > n and not graphs.broken:  # each padding row: token 0's key at position 0
                out["padded_steps"] += 1
                pad_keys = static.k[:, n:rows, :, 0]  # [layers, rows - n, groups, d]
                out["pad_writes_ok"] &= bool(torch.allclose(pad_keys, k0[:, None], atol=1e-5))
            pos = pos + 1
        out["counters"] = dict(graphs.counters)
        out["broken"] = graphs.broken
    out["warnings"] = [str(w.message) for w in caught]
    return out


def check_static(res: dict, captured: bool = False) -> None:
    """The static steps' logits and cache equal the live ones (fp32, to rounding: another
    attention kernel may sum in another order), every bucket was met, and each step ran at its
    static shape (a graph records that shape: the replays' shapes are the warm-ups')."""
    assert res["scale"] > 1.0, res  # the logits are not trivially small
    assert res["err"] < 2e-5 * res["scale"] and res["cache_err"] < 1e-5, res
    assert res["pad_writes_ok"] and res["padded_steps"] >= 3, res
    assert res["run_at"] == res["shapes"], res
    assert not res["broken"], res
    assert not [w for w in res["warnings"] if "CUDA graph" in w], res["warnings"]
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


def test_capture_path_with_a_stand_in_recorder():
    """The capture path on the CPU (warm-up, one output buffer for every shape, the checked
    first replay, replays), with a recorder whose replays re-run the step after poisoning the
    output buffer: the logits are those of the step itself, one capture per shape."""
    for res in run_distributed(static_worker, 2, True, "ok", timeout=300):
        check_static(res, captured=True)


@pytest.mark.parametrize("fake", ["raise", "wrong"])
def test_failed_or_wrong_capture_on_one_rank_falls_back_on_every_rank(fake):
    """A capture that raises on one TP rank only, or whose replay gives other logits: every
    rank warns once and decodes at the live shapes from then on (the same collectives on every
    rank, so no mismatch or hang), with the live logits."""
    for res in run_distributed(static_worker, 2, True, fake, timeout=300):
        assert res["broken"] and res["counters"] == {"captures": 0, "replays": 0, "eager": 11}
        assert res["err"] < 2e-5 * res["scale"] and res["cache_err"] < 1e-5, res
        assert len(res["warnings"]) == 1, res["warnings"]
        why = "other logits" if fake == "wrong" else "fail"
        assert "CUDA graph capture" in res["warnings"][0] and why in res["warnings"][0]


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


def _generate_worker(rank, world):
    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.rollout.decode_graphs import DecodeGraphs
    from tests.rollout.test_generate import PAD, _model, _prompts

    DecodeGraphs._record = _fake_recorder("ok", rank, world)
    init = DecodeGraphs.__init__

    def capturing(self, fast, row_multiple=8, length_bucket=256, capture=None):
        init(self, fast, row_multiple, length_bucket, capture=True)  # as on CUDA

    DecodeGraphs.__init__ = capturing
    model = _model(world)
    prompts = _prompts() * 3  # 18 prompts: compaction, and refills in continuous batching
    out, stats = {}, {}
    for name, kw in {
        "default": dict(continuous=False),
        "graphs": dict(continuous=False, decode_graphs=True),
        "continuous": dict(max_batch=5, decode_graphs=True),
    }.items():
        stats[name] = {}
        out[name] = generate(
            model, prompts, max_new_tokens=12, eos_id=5, pad_id=PAD, vocab_size=16,
            params=SamplingParams(), generator=torch.Generator().manual_seed(2),
            compact_frac=0.1, stats=stats[name], **kw,
        )  # fmt: skip
    return {k: (v.tokens, v.logprobs) for k, v in out.items()}, stats


def test_generate_through_the_capture_path_gives_the_same_tokens():
    """generate(decode_graphs=True) through the capture path (the stand-in recorder, which
    poisons the shared output buffer before each replay) at TP 2: the plain decoder with
    compaction and continuous batching give the default decoder's tokens."""
    for out, stats in run_distributed(_generate_worker, 2, timeout=300):
        tokens, logprobs = out["default"]
        for name in ("graphs", "continuous"):
            assert torch.equal(out[name][0], tokens), name
            torch.testing.assert_close(out[name][1], logprobs, atol=1e-5, rtol=1e-5)
            st = stats[name]
            assert 0 < st["graph_captures"] < st["graph_replays"] and st["static_eager"] == 0, st
        assert stats["graphs"]["compactions"] > 0 and stats["continuous"]["refills"] > 1
