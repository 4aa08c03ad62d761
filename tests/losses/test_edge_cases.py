"""Extreme inputs, bad inputs, the collective budget, and the compiled kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_eaopd import losses as L
from tests.dist import run_distributed
from tests.losses import reference as R

SB = (4, 2)
_COLLECTIVES = (
    "all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
    "reduce_scatter_tensor", "all_to_all_single", "barrier", "reduce", "gather", "scatter",
)  # fmt: skip


def _count_collectives():
    """Wrap torch.distributed's collectives; return the live counter dict."""
    counts = {}
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*a, **k)

        setattr(dist, name, wrapped)
    return counts


def _extremes_worker(rank, tp):
    group = dist.group.WORLD
    v = 64 * tp
    finite = lambda x: bool(torch.isfinite(x).all())  # noqa: E731

    # 1) collective budget of the exact EOPD: forward 1 collective, backward none
    fs, ft = R.full_logits(SB, v, 1), R.full_logits(SB, v, 2)
    s = R.shard(fs, rank, tp).requires_grad_(True)
    t = R.shard(ft, rank, tp)
    counts = _count_collectives()
    loss, _ = L.vocab_parallel_eopd_loss(s, t, tp_group=group)
    fwd = sum(counts.values())
    counts.clear()
    loss.sum().backward()
    bwd = sum(counts.values())
    counts.clear()
    L.vocab_parallel_teacher_payload(t, torch.zeros(SB, dtype=torch.long), 4, tp_group=group)
    payload = sum(counts.values())
    assert (fwd, bwd, payload) == (1, 0, 1), (fwd, bwd, payload)

    # 2) logits of +-1e4, -inf masked columns (same in both), temperature 0.1
    for scale, temp in ((1e4, 1.0), (3.0, 0.1)):
        fs = R.full_logits(SB, v, 3, scale=scale)
        ft = R.full_logits(SB, v, 4, scale=scale)
        mask = R.full_logits(SB, v, 5) > 0.5  # about 30% of columns masked
        mask[..., 0] = False
        fs, ft = fs.masked_fill(mask, -math.inf), ft.masked_fill(mask, -math.inf)
        s = R.shard(fs, rank, tp).requires_grad_(True)
        t = R.shard(ft, rank, tp)
        loss, m = L.vocab_parallel_eopd_loss(s, t, temperature=temp, tp_group=group)
        (g,) = torch.autograd.grad(loss.sum(), s)
        assert finite(loss) and finite(g), f"non-finite at scale {scale} T {temp}"
        assert bool((g[R.shard(mask, rank, tp)] == 0).all()), "masked columns got gradient"
        ls, lt = R.ref_logp(fs, v, temp), R.ref_logp(ft, v, temp)
        ht = R.ref_entropy(lt)
        ref = R.ref_kl(ls, lt) + (ht >= 0.8).double() * R.ref_kl(lt, ls)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
        ent = L.vocab_parallel_entropy(s, temperature=temp, tp_group=group)
        torch.testing.assert_close(ent.double(), R.ref_entropy(ls), rtol=1e-4, atol=1e-4)

    # 3) a one-hot teacher (-inf everywhere but one column): finite entropy, payload, FKL
    tok = torch.randint(0, v, SB, generator=torch.Generator().manual_seed(6))
    onehot = torch.full((*SB, v), -math.inf).scatter_(-1, tok[..., None], 0.0)
    t = R.shard(onehot, rank, tp)
    s = R.shard(R.full_logits(SB, v, 7), rank, tp).requires_grad_(True)
    pay = L.vocab_parallel_teacher_payload(t, tok, 3, tp_group=group)
    assert bool((pay.entropy == 0).all()) and bool((pay.token_logprobs == 0).all())
    assert torch.equal(pay.topk_ids[..., 0], tok) and bool((pay.topk_logprobs[..., 0] == 0).all())
    terms = L.vocab_parallel_kl_terms(s, t, tp_group=group)
    (g,) = torch.autograd.grad(terms["fkl"].sum(), s)
    assert finite(terms["fkl"]) and finite(g)
    # a one-hot teacher given by a large logit gap: the full EOPD (reverse KL too) stays finite
    gap = torch.zeros(*SB, v).scatter_(-1, tok[..., None], 1e4)
    loss, m = L.vocab_parallel_eopd_loss(s, R.shard(gap, rank, tp), tp_group=group)
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert finite(loss) and finite(g) and bool((m["teacher_entropy"] == 0).all())

    # 4) shard widths that differ between ranks: every rank raises the same ValueError
    width = 64 + rank
    try:
        L.vocab_parallel_entropy(torch.randn(*SB, width), tp_group=group)
    except ValueError as exc:
        assert "different widths" in str(exc), exc
    else:
        raise AssertionError("mismatched shard widths were accepted")
    return True


def test_extremes_and_collective_budget_tp2():
    assert run_distributed(_extremes_worker, 2) == [True, True]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t: L.vocab_parallel_entropy(s.masked_fill(s > 1, math.nan)), "NaN"),
        (lambda s, t: L.vocab_parallel_eopd_loss(s, t.masked_fill(t > 1, math.nan)), "NaN"),
        (lambda s, t: L.vocab_parallel_eopd_loss(s, t[..., :-1]), "same shape"),
        (lambda s, t: L.vocab_parallel_entropy(s, vocab_size=s.shape[-1] + 1), "does not fit"),
        (lambda s, t: L.vocab_parallel_topk(s, 11, vocab_size=10), "k=11"),
        (lambda s, t: L.vocab_parallel_topk(s, 0), "k=0"),
        (lambda s, t: L.vocab_parallel_token_logprobs(s, torch.full(s.shape[:-1], 10)), "outside"),
        (lambda s, t: L.vocab_parallel_token_logprobs(s, torch.zeros(3, 3).long()), "shape"),
        (lambda s, t: L.vocab_parallel_token_logprobs(s, torch.zeros(s.shape[:-1])), "integer"),
        (lambda s, t: L.vocab_parallel_entropy(s, temperature=0.0), "temperature"),
        (lambda s, t: L.vocab_parallel_entropy(s.long()), "float32"),
        (lambda s, t: L.vocab_parallel_entropy(torch.full_like(s, -math.inf)), "-inf"),
        (lambda s, t: L.ObjectiveConfig(temperature=0), "temperature"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, 10, generator=g), torch.randn(3, 2, 10, generator=g)
    with pytest.raises(ValueError, match=match):
        call(s, t)


def test_compiled_kernels_match_eager(monkeypatch):
    """The torch.compile path (the default outside tests) equals the eager path."""
    from megatron_eaopd.losses import _kernels

    g = torch.Generator().manual_seed(1)
    cases = [(torch.float32, 70, 64), (torch.bfloat16, 64, 64)]  # (dtype, width, vocab_size)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("EAOPD_COMPILE", mode)
        monkeypatch.setenv("EAOPD_CHUNK_ELEMS", "200")  # several row chunks, ragged last one
        monkeypatch.setenv("EAOPD_COMPILE_MIN_ELEMS", "0")  # compile even these tiny chunks
        assert _kernels.compile_enabled() == (mode == "1")
        for dtype, width, vocab in cases:
            s = torch.randn(5, 3, width, generator=torch.Generator().manual_seed(2)).to(dtype)
            t = torch.randn(5, 3, width, generator=torch.Generator().manual_seed(3)).to(dtype)
            ids = torch.randint(0, vocab, (5, 3, 2), generator=g.manual_seed(4))
            s.requires_grad_(True)
            loss, m = L.vocab_parallel_eopd_loss(s, t, vocab_size=vocab, entropy_threshold=3.0)
            (g1,) = torch.autograd.grad(loss.sum() + m["rkl"].sum(), s)
            lp = L.vocab_parallel_gather_logprobs(s, ids, vocab_size=vocab, temperature=0.5)
            ent = L.vocab_parallel_entropy(s, vocab_size=vocab, temperature=0.5)
            (g2,) = torch.autograd.grad(lp.sum() + ent.sum(), s)
            results[(mode, dtype)] = (loss, m["teacher_entropy"], g1, lp, ent, g2)
    assert not _kernels._compile_broken, "torch.compile failed and fell back to eager"
    assert len(_kernels._compiled) >= 4, "the compiled mode did not compile the kernels"
    for dtype, *_ in cases:
        for a, b in zip(results[("0", dtype)], results[("1", dtype)]):
            R.assert_close(a.detach(), b.detach(), dtype, "grad", f"compiled vs eager {dtype}")


def test_saved_for_backward_is_inputs_plus_per_token_values():
    """Everything autograd keeps for backward is one of the input shards (same storage, no copy)
    or a per-token tensor of O(s * b) values."""
    s = torch.randn(16, 4, 1000, requires_grad=True)
    t = torch.randn(16, 4, 1000)
    ids = torch.randint(0, 1000, (16, 4))
    n_tokens = 16 * 4
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    saved = []

    def pack(x):
        saved.append((x.untyped_storage().data_ptr(), x.numel()))
        return x

    cfg = L.ObjectiveConfig(top_k=8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = L.vocab_parallel_eopd_loss(s, t)
        payload = L.vocab_parallel_teacher_payload(t, ids, 8)
        old = torch.zeros(16, 4)
        loss2, _ = L.sampled_objective(cfg, s, ids, old, payload)
        jsd = L.vocab_parallel_jsd(s, t)["jsd"]
    assert saved, "saved_tensors_hooks saw nothing"
    for ptr, numel in saved:
        assert ptr in inputs or numel <= n_tokens * (cfg.top_k + 1), (ptr, numel)
    assert sum(ptr in inputs for ptr, _ in saved) >= 2  # the shards themselves, not copies
    (loss.sum() + loss2.sum() + jsd.sum()).backward()
    assert torch.isfinite(s.grad).all()


def test_a_column_masked_in_both_models_is_no_error():
    """-inf on the same column in both: no mass in either, finite terms equal to the float64
    reference over the other columns."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 2, 10, generator=g), torch.randn(3, 2, 10, generator=g)
    s[1, 0, 3] = t[1, 0, 3] = -math.inf
    terms = L.vocab_parallel_kl_terms(s, t)
    rkl, fkl = terms["rkl"], terms["fkl"]
    keep = torch.arange(10) != 3
    ps = torch.log_softmax(s[1, 0, keep].double(), -1)
    pt = torch.log_softmax(t[1, 0, keep].double(), -1)
    assert float(rkl[1, 0]) == pytest.approx(float((ps.exp() * (ps - pt)).sum()), rel=1e-5)
    assert float(fkl[1, 0]) == pytest.approx(float((pt.exp() * (pt - ps)).sum()), rel=1e-5)


@pytest.mark.parametrize("s_len", [0])
def test_empty_inputs_give_empty_outputs(s_len):
    """Zero tokens: every statistic returns its shape with 0 rows (no reshape error), as the
    exact loss already did."""
    x = torch.randn(s_len, 2, 16, requires_grad=True)
    ids = torch.zeros(s_len, 2, dtype=torch.long)
    payload = L.vocab_parallel_teacher_payload(x, ids, k=4, vocab_size=12)
    assert [tuple(p.shape) for p in payload] == [(0, 2), (0, 2), (0, 2, 4), (0, 2, 4)]
    many = torch.zeros(s_len, 2, 3, dtype=torch.long)
    assert tuple(L.vocab_parallel_gather_logprobs(x, many, vocab_size=12).shape) == (0, 2, 3)
    lp, ent = L.vocab_parallel_logprobs_and_entropy(x, many, vocab_size=12)
    assert (tuple(lp.shape), tuple(ent.shape)) == ((0, 2, 3), (0, 2))
