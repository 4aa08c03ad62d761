"""Vocab-parallel statistics and the exact EOPD loss on 1, 2 and 4 gloo ranks.

Every value and gradient is checked against float64 math on the gathered vocabulary
(tests/losses/reference.py) and, where they coincide, against megatron-core's
vocab_parallel_cross_entropy. One launch per TP size runs all cases to keep CI fast.
"""

from __future__ import annotations

import pytest
import torch

from megatron_eaopd import losses as L
from megatron_eaopd.parallel.vocab import padded_vocab_size
from tests.dist import run_distributed
from tests.losses import reference as R

SB = (3, 2)  # [s, b]


def _vocab_cases(tp):
    # (true vocab size, padded size): even; uneven padded Megatron-style (32003 -> 128 * tp); a
    # small vocabulary whose padding fills whole ranks at TP 4 (320 -> 512: rank 3 is padding).
    return [
        (96 * tp, 96 * tp),
        (32003, padded_vocab_size(32003, tp)),
        (320, padded_vocab_size(320, tp)),
    ]


def _check_statistics(rank, tp, group, dtype, vocab, v_pad, temperature, seed):
    full = R.full_logits(SB, v_pad, seed, dtype=dtype)
    full[..., vocab:] = 50.0  # finite garbage in the padding: must be ignored
    x = R.shard(full, rank, tp).requires_grad_(True)
    kw = dict(temperature=temperature, tp_group=group, vocab_size=vocab)
    lp_ref = R.ref_logp(full, vocab, temperature)
    tag = f"tp{tp} {dtype} V={vocab} T={temperature}"

    # entropy: value and gradient
    ent = L.vocab_parallel_entropy(x, **kw)
    R.assert_close(ent, R.ref_entropy(lp_ref), dtype, what=f"entropy {tag}")
    w = torch.linspace(0.5, 1.5, ent.numel()).reshape(ent.shape).double()
    (g,) = torch.autograd.grad((ent * w.to(ent.dtype)).sum(), x)

    def ent_fn(f):
        return (R.ref_entropy(R.ref_logp(f, vocab, temperature)) * w).sum()

    gref = R.ref_grad(ent_fn, full, vocab, rank, tp)
    R.assert_close(g, gref, dtype, "grad", f"entropy grad {tag}")

    # token log-probs (ids spread over all shards) and gathered log-probs at several ids
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, SB + (4,), generator=gen)
    ids[..., 0] = vocab - 1  # last real column (on the last rank)
    tok = ids[..., 1]
    lp = L.vocab_parallel_token_logprobs(x, tok, **kw)
    R.assert_close(lp, lp_ref.gather(-1, tok[..., None])[..., 0], dtype, what=f"token lp {tag}")
    glp = L.vocab_parallel_gather_logprobs(x, ids, **kw)
    R.assert_close(glp, lp_ref.gather(-1, ids), dtype, what=f"gather lp {tag}")
    wj = torch.linspace(-1.0, 2.0, glp.numel()).reshape(glp.shape).double()
    (g,) = torch.autograd.grad((glp * wj.to(glp.dtype)).sum(), x)
    gref = R.ref_grad(
        lambda f: (R.ref_logp(f, vocab, temperature).gather(-1, ids) * wj).sum(),
        full, vocab, rank, tp,
    )  # fmt: skip
    R.assert_close(g, gref, dtype, "grad", f"gather lp grad {tag}")

    # top-k: sorted log-probs over the full vocabulary and global ids
    k = 16
    top_lp, top_ids = L.vocab_parallel_topk(x, k, **kw)
    ref_v, ref_i = lp_ref.topk(k, dim=-1)
    R.assert_close(top_lp, ref_v, dtype, what=f"topk values {tag}")
    assert torch.equal(lp_ref.gather(-1, top_ids), lp_ref.gather(-1, ref_i)), f"topk ids {tag}"
    assert bool((top_lp[..., :-1] >= top_lp[..., 1:]).all()), f"topk not sorted {tag}"

    # teacher payload: all four fields in one call
    pay = L.vocab_parallel_teacher_payload(x, tok, k, **kw)
    R.assert_close(pay.entropy, R.ref_entropy(lp_ref), dtype, what=f"payload entropy {tag}")
    R.assert_close(pay.token_logprobs, lp, dtype, what=f"payload token lp {tag}")
    R.assert_close(pay.topk_logprobs, ref_v, dtype, what=f"payload topk {tag}")
    assert torch.equal(pay.topk_ids, top_ids)


def _check_kl(rank, tp, group, dtype, vocab, v_pad, temperature, seed):
    fs = R.full_logits(SB, v_pad, seed, dtype=dtype)
    ft = R.full_logits(SB, v_pad, seed + 7, scale=1.5, dtype=dtype)
    fs[..., vocab:], ft[..., vocab:] = -30.0, 80.0
    s = R.shard(fs, rank, tp).requires_grad_(True)
    t = R.shard(ft, rank, tp)
    kw = dict(temperature=temperature, tp_group=group, vocab_size=vocab)
    tag = f"tp{tp} {dtype} V={vocab} T={temperature}"
    ls, lt = R.ref_logp(fs, vocab, temperature), R.ref_logp(ft, vocab, temperature)
    ht = R.ref_entropy(lt)
    srt = ht.flatten().sort().values
    tau = float(srt[2:4].mean())  # between two tokens' entropies: gates half, no ties
    loss, m = L.vocab_parallel_eopd_loss(s, t, entropy_threshold=tau, fkl_coef=0.7, **kw)
    gate = (ht >= tau).double()
    R.assert_close(m["rkl"], R.ref_kl(ls, lt), dtype, what=f"rkl {tag}")
    R.assert_close(m["fkl"], R.ref_kl(lt, ls), dtype, what=f"fkl {tag}")
    R.assert_close(m["teacher_entropy"], ht, dtype, what=f"H_T {tag}")
    R.assert_close(m["student_entropy"], R.ref_entropy(ls), dtype, what=f"H_S {tag}")
    assert torch.equal(m["gate"].double(), gate), f"gate {tag}"
    ref_loss = R.ref_kl(ls, lt) + 0.7 * gate * R.ref_kl(lt, ls)
    R.assert_close(loss, ref_loss, dtype, what=f"eopd loss {tag}")
    (g,) = torch.autograd.grad(loss.sum(), s)

    def ref_fn(f):
        lsf = R.ref_logp(f, vocab, temperature)
        return (R.ref_kl(lsf, lt) + 0.7 * gate * R.ref_kl(lt, lsf)).sum()

    R.assert_close(g, R.ref_grad(ref_fn, fs, vocab, rank, tp), dtype, "grad", f"eopd grad {tag}")

    # the general backward: arbitrary upstream weights on rkl, fkl and student entropy
    terms = L.vocab_parallel_kl_terms(s, t, **kw)
    a, b, c = (torch.randn(SB, generator=torch.Generator().manual_seed(i)) for i in (1, 2, 3))
    a, b, c = a.double(), b.double(), c.double()
    obj = (terms["rkl"] * a + terms["fkl"] * b + terms["student_entropy"] * c).sum()
    (g,) = torch.autograd.grad(obj, s)

    def ref_fn2(f):
        lsf = R.ref_logp(f, vocab, temperature)
        return (R.ref_kl(lsf, lt) * a + R.ref_kl(lt, lsf) * b + R.ref_entropy(lsf) * c).sum()

    R.assert_close(g, R.ref_grad(ref_fn2, fs, vocab, rank, tp), dtype, "grad", f"kl terms {tag}")


def _megatron_reference(rank, tp):
    """Second, independent reference: megatron-core's vocab_parallel_cross_entropy.

    A token log-prob is minus the cross-entropy; forward KL against a one-hot teacher is the
    cross-entropy. Uses the default tp_group (megatron's parallel state).
    """
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        v = 96 * tp
        full = R.full_logits(SB, v, 11)
        x = R.shard(full, rank, tp).requires_grad_(True)
        tok = torch.randint(0, v, SB, generator=torch.Generator().manual_seed(5))
        x_m = x.detach().clone().requires_grad_(True)
        ce = tensor_parallel.vocab_parallel_cross_entropy(x_m.clone(), tok)
        (g_ce,) = torch.autograd.grad(ce.sum(), x_m)
        lp = L.vocab_parallel_token_logprobs(x, tok)  # tp_group=None -> megatron's TP group
        torch.testing.assert_close(lp, -ce, atol=1e-5, rtol=1e-5)
        (g,) = torch.autograd.grad(-lp.sum(), x)
        torch.testing.assert_close(g, g_ce, atol=1e-5, rtol=1e-5)
        # one-hot teacher: -inf everywhere but the token
        onehot = torch.full_like(full, float("-inf"))
        onehot.scatter_(-1, tok[..., None], 0.0)
        t = R.shard(onehot, rank, tp)
        terms = L.vocab_parallel_kl_terms(x, t)
        torch.testing.assert_close(terms["fkl"], ce.detach(), atol=1e-5, rtol=1e-5)
        assert torch.all(terms["teacher_entropy"] == 0)
        (g,) = torch.autograd.grad(terms["fkl"].sum(), x)
        torch.testing.assert_close(g, g_ce, atol=1e-5, rtol=1e-5)
    finally:
        parallel_state.destroy_model_parallel()


def _worker(rank, tp):
    group = torch.distributed.group.WORLD if tp > 1 else None
    n = 0
    for vocab, v_pad in _vocab_cases(tp):
        for dtype in (torch.float32, torch.bfloat16):
            for temperature in (1.0, 0.7):
                seed = 100 * tp + n
                _check_statistics(rank, tp, group, dtype, vocab, v_pad, temperature, seed)
                _check_kl(rank, tp, group, dtype, vocab, v_pad, temperature, seed)
                n += 1
    _megatron_reference(rank, tp)
    return n


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_matches_float64_reference(tp):
    results = run_distributed(_worker, tp, timeout=300)
    assert results == [12] * tp


def test_gradcheck_float64_tp1():
    """torch.autograd.gradcheck of every differentiable function at TP 1 in float64."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 10, (2, 3, 2), generator=g)
    kw = dict(vocab_size=10, temperature=0.8)

    def kl(x):
        terms = L.vocab_parallel_kl_terms(x, t, **kw)
        return terms["rkl"], terms["fkl"], terms["student_entropy"]

    for fn in (
        kl,
        lambda x: L.vocab_parallel_eopd_loss(x, t, entropy_threshold=1.5, **kw)[0],
        lambda x: L.vocab_parallel_entropy(x, **kw),
        lambda x: L.vocab_parallel_gather_logprobs(x, ids, **kw),
        lambda x: L.vocab_parallel_token_logprobs(x, ids[..., 0], **kw),
    ):
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)
