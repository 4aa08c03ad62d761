"""The losses fused with the output layer (losses/fused.py) on 1, 2 and 4 gloo ranks.

Each fused function is compared with (a) the unfused path on the same dtype: the output layer's
product `hidden @ weight_shard.T` fed to the logits-based function, gradients through autograd and
the hidden-state gradient summed over TP ranks (megatron's all-reduce of the output layer's input
gradient), and (b) an independent float64 reference on the gathered vocabulary
(`full_hidden @ full_weight.T`, tests/losses/reference.py). float64 at 1e-10, fp32 at 1e-5 / 1e-4,
bf16 at 1e-2 (against the bf16 unfused path). Padded vocabularies, including one whose last rank at
TP 4 holds only padding. One launch per TP size runs every case.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from megatron_eaopd import losses as L
from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.parallel.vocab import padded_vocab_size
from tests.dist import run_distributed
from tests.losses import reference as R
from tests.losses.test_edge_cases import _count_collectives
from tests.losses.test_objectives import _ref_sampled

SB = (5, 3)  # [s, b]: 15 tokens
H_S, H_T = 12, 8  # student and teacher hidden sizes


def _inputs(v_pad, dtype, seed):
    """Hidden states and full (gathered) weights, identical on every rank; logits ~ N(0, 2.5^2)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    hs, ht = rnd(*SB, H_S), rnd(*SB, H_T)
    ws, wt = rnd(v_pad, H_S, scale=2.5 / H_S**0.5), rnd(v_pad, H_T, scale=1.5 / H_T**0.5)
    return hs, ws, ht, wt


def _tp_sum(t, group):
    t = t.clone()
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def _check(actual, unfused, ref, dtype, kind, what):
    """Fused vs the unfused path (same dtype) and vs the float64 reference (not for bf16, whose
    rounded matmul differs from the exact product by more than its tolerance)."""
    R.assert_close(actual, unfused, dtype, kind, f"{what} vs unfused")
    _record(actual, unfused, dtype, "unfused", kind)
    if dtype != torch.bfloat16:
        R.assert_close(actual, ref, dtype, kind, f"{what} vs float64 reference")
        _record(actual, ref, dtype, "float64", kind)


_ERRORS: dict = {}  # (dtype, against, kind) -> largest absolute difference seen (for the docs)


def _record(actual, expected, dtype, against, kind):
    key = (str(dtype).replace("torch.", ""), against, kind)
    diff = float((actual.detach().double() - expected.detach().double()).abs().max())
    _ERRORS[key] = max(_ERRORS.get(key, 0.0), diff)


def _check_exact(rank, tp, group, dtype, vocab, v_pad, temperature, chunk, seed):
    hs_f, ws_f, ht_f, wt_f = _inputs(v_pad, dtype, seed)
    ws_f[vocab:] *= 40.0  # large finite padding logits: must be ignored
    tag = f"tp{tp} {dtype} V={vocab} T={temperature} chunk={chunk}"
    kw = dict(temperature=temperature, tp_group=group, vocab_size=vocab)
    ws, wt = R.shard(ws_f.T, rank, tp).T, R.shard(wt_f.T, rank, tp).T  # [V_pad / tp, h]

    # float64 reference on the gathered vocabulary
    hs64, ws64 = hs_f.double().requires_grad_(True), ws_f.double().requires_grad_(True)
    lt = R.ref_logp(ht_f.double() @ wt_f.double().T, vocab, temperature)
    ls = R.ref_logp(hs64 @ ws64.T, vocab, temperature)
    ht_ref = R.ref_entropy(lt)
    tau = float(ht_ref.flatten().sort().values[6:8].mean())  # gates about half, no ties
    gate = (ht_ref >= tau).double()
    ref_loss = R.ref_kl(ls, lt) + 0.7 * gate * R.ref_kl(lt, ls)
    up = torch.linspace(0.5, 1.5, ref_loss.numel(), dtype=torch.float64).reshape(SB)
    ref_gh, ref_gw = torch.autograd.grad((ref_loss * up).sum(), (hs64, ws64))
    ref_gw = R.shard(ref_gw.T, rank, tp).T

    # fused
    hs = hs_f.clone().requires_grad_(True)
    ws = ws.clone().requires_grad_(True)
    loss, m = L.vocab_parallel_linear_eopd_loss(
        hs, ws, ht_f, wt, entropy_threshold=tau, fkl_coef=0.7, chunk_size=chunk, **kw
    )
    gh, gw = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), (hs, ws))

    # unfused: the output layer's product, then the logits-based loss
    hs_u, ws_u = hs_f.clone().requires_grad_(True), ws.detach().clone().requires_grad_(True)
    loss_u, m_u = L.vocab_parallel_eopd_loss(
        hs_u @ ws_u.T, ht_f @ wt.T, entropy_threshold=tau, fkl_coef=0.7, **kw
    )
    gh_u, gw_u = torch.autograd.grad((loss_u * up.to(loss_u.dtype)).sum(), (hs_u, ws_u))
    gh_u = _tp_sum(gh_u, group)

    # one pass (grad_weights): gradients made in forward for an upstream c * grad_weights, and
    # recomputed for any other upstream gradient
    mask = (up > 0.8).to(dtype)
    for gw_, upstream, path in ((up, 0.5 * up, "one pass"), (mask, up, "one pass, fallback")):
        hs1, ws1 = hs_f.clone().requires_grad_(True), ws.detach().clone().requires_grad_(True)
        loss1, m1 = L.vocab_parallel_linear_eopd_loss(
            hs1, ws1, ht_f, wt, entropy_threshold=tau, fkl_coef=0.7, chunk_size=chunk,
            grad_weights=gw_.to(dtype), **kw,
        )  # fmt: skip
        g1 = torch.autograd.grad((loss1 * upstream.to(loss1.dtype)).sum(), (hs1, ws1))
        scale = 0.5 if path == "one pass" else 1.0
        _check(loss1, loss_u, ref_loss, dtype, "value", f"{path} loss {tag}")
        _check(g1[0], scale * gh_u, scale * ref_gh, dtype, "grad", f"{path} d hidden {tag}")
        _check(g1[1], scale * gw_u, scale * ref_gw, dtype, "grad", f"{path} d weight {tag}")
        assert torch.equal(m1["gate"], m_u["gate"]), f"{path} gate {tag}"
    assert torch.equal(m["gate"], m_u["gate"]), f"gate {tag}"
    if dtype != torch.bfloat16:
        assert torch.equal(m["gate"].double(), gate), f"gate vs reference {tag}"
    _check(loss, loss_u, ref_loss, dtype, "value", f"eopd loss {tag}")
    _check(m["teacher_entropy"], m_u["teacher_entropy"], ht_ref, dtype, "value", f"H_T {tag}")
    _check(m["student_entropy"], m_u["student_entropy"], R.ref_entropy(ls), dtype, "value", tag)
    _check(gh, gh_u, ref_gh, dtype, "grad", f"d hidden {tag}")
    _check(gw, gw_u, ref_gw, dtype, "grad", f"d weight {tag}")
    assert bool((gw[max(0, vocab - rank * ws.shape[0]) :] == 0).all()), f"padding grad {tag}"


def _check_sampled(rank, tp, group, dtype, vocab, v_pad, chunk, tail, seed):
    hs_f, ws_f, ht_f, wt_f = _inputs(v_pad, dtype, seed)
    tag = f"tp{tp} {dtype} V={vocab} chunk={chunk} tail={tail}"
    kw = dict(tp_group=group, vocab_size=vocab)
    ws, wt = R.shard(ws_f.T, rank, tp).T, R.shard(wt_f.T, rank, tp).T
    k = 6
    y = torch.randint(0, vocab, SB, generator=torch.Generator().manual_seed(seed + 1))
    y[0, 0] = vocab - 1  # the last real column
    fs64 = hs_f.double() @ ws_f.double().T
    ft64 = ht_f.double() @ wt_f.double().T
    lt = R.ref_logp(ft64, vocab)
    noise = torch.randn(SB, generator=torch.Generator().manual_seed(seed + 2)).double() * 0.4
    old = R.ref_logp(fs64, vocab).gather(-1, y[..., None])[..., 0] + noise

    # teacher payload: fused vs unfused vs reference
    pay = L.vocab_parallel_linear_teacher_payload(ht_f, wt, y, k, chunk_size=chunk, **kw)
    pay_u = L.vocab_parallel_teacher_payload(ht_f @ wt.T, y, k, **kw)
    ref_v, _ = lt.topk(k, dim=-1)
    _check(pay.entropy, pay_u.entropy, R.ref_entropy(lt), dtype, "value", f"payload H {tag}")
    ref_lp = lt.gather(-1, y[..., None])[..., 0]
    _check(pay.token_logprobs, pay_u.token_logprobs, ref_lp, dtype, "value", f"payload lp {tag}")
    _check(pay.topk_logprobs, pay_u.topk_logprobs, ref_v, dtype, "value", f"payload topk {tag}")
    if dtype == torch.bfloat16:  # ties are exact in bf16: any tied choice is a correct top-k
        lt_u = R.ref_logp((ht_f @ wt_f.T).double(), vocab)
        assert torch.equal(lt_u.gather(-1, pay.topk_ids), lt_u.gather(-1, pay_u.topk_ids)), tag
    else:
        assert torch.equal(pay.topk_ids, pay_u.topk_ids), f"payload ids {tag}"

    # the paper's objective from the student's hidden states
    ht_ref = R.ref_entropy(lt)
    tau = float(ht_ref.flatten().sort().values[6:8].mean())
    cfg = L.ObjectiveConfig(
        name="eopd", entropy_threshold=tau, fkl_coef=0.5, top_k=k, tail_bucket=tail,
        chunk_size=chunk,
    )  # fmt: skip
    hs = hs_f.clone().requires_grad_(True)
    ws_l = ws.clone().requires_grad_(True)
    loss, m = L.linear_sampled_objective(cfg, hs, ws_l, y, old.to(dtype), pay, **kw)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(SB)
    gh, gw = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), (hs, ws_l))
    hs_u, ws_u = hs_f.clone().requires_grad_(True), ws.detach().clone().requires_grad_(True)
    loss_u, m_u = L.sampled_objective(cfg, hs_u @ ws_u.T, y, old.to(dtype), pay, **kw)
    gh_u, gw_u = torch.autograd.grad((loss_u * up.to(loss_u.dtype)).sum(), (hs_u, ws_u))
    gh_u = _tp_sum(gh_u, group)
    assert 0 < m["gate"].sum() < m["gate"].numel(), f"gate covers one side only {tag}"
    assert m["clip_frac"].sum() > 0, f"no token clipped {tag}"

    ref_loss = ref_gh = ref_gw = None  # bf16: its rounded product has another top-k set
    if dtype != torch.bfloat16:
        top = pay.topk_ids
        ref_fn, _ = _ref_sampled(fs64, ft64, vocab, y, old, k, tau, 0.5, 0.2, tail, top)
        hs64, ws64 = hs_f.double().requires_grad_(True), ws_f.double().requires_grad_(True)
        ref_loss = ref_fn(hs64 @ ws64.T)
        ref_gh, ref_gw = torch.autograd.grad((ref_loss * up).sum(), (hs64, ws64))
        ref_gw = R.shard(ref_gw.T, rank, tp).T
    _check(loss, loss_u, ref_loss, dtype, "value", f"sampled loss {tag}")
    for name in ("student_entropy", "fkl", "pg_loss"):
        R.assert_close(m[name], m_u[name], dtype, what=f"{name} {tag}")
    _check(gh, gh_u, ref_gh, dtype, "grad", f"sampled d hidden {tag}")
    _check(gw, gw_u, ref_gw, dtype, "grad", f"sampled d weight {tag}")

    # one pass (grad_weights): the upstream gradient it was told (no recompute), then another one
    # (the chunks recomputed); the same values, metrics and gradients
    for told in (up, torch.ones_like(up)):
        hs1, ws1 = hs_f.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss1, m1 = L.linear_sampled_objective(
            cfg, hs1, ws1, y, old.to(dtype), pay, grad_weights=told.to(dtype), **kw
        )
        gh1, gw1 = torch.autograd.grad((loss1 * up.to(loss1.dtype)).sum(), (hs1, ws1))
        what = f"one-pass sampled ({'told' if told is up else 'other'} upstream) {tag}"
        _check(loss1, loss_u, ref_loss, dtype, "value", f"{what} loss")
        for name in m_u:
            R.assert_close(m1[name], m_u[name], dtype, what=f"{what} {name}")
        _check(gh1, gh_u, ref_gh, dtype, "grad", f"{what} d hidden")
        _check(gw1, gw_u, ref_gw, dtype, "grad", f"{what} d weight")


def _check_collectives(rank, tp, group):
    """Per call: forward 1 all-gather, backward 1 all-reduce (hidden grad), whatever the number of
    chunks; none per chunk. reduce_hidden_grad=False: backward none, and the rank's partial."""
    vocab, v_pad = 300, padded_vocab_size(300, tp)
    hs_f, ws_f, ht_f, wt_f = _inputs(v_pad, torch.float64, 9)
    ws, wt = R.shard(ws_f.T, rank, tp).T, R.shard(wt_f.T, rank, tp).T
    y = torch.zeros(SB, dtype=torch.long)
    calls: Counter = Counter()
    names = ("pair_stats", "pair_backward", "single_stats", "single_backward")
    orig = {name: getattr(K, name) for name in names}

    def counted(name):
        def fn(*args):
            calls[name] += 1
            return orig[name](*args)

        return fn

    counts = _count_collectives()
    try:
        for name in orig:
            setattr(K, name, counted(name))
        for chunk in (1, 4, 15, None):
            n_chunks = 1 if chunk is None else math.ceil(15 / chunk)
            for reduce in (True, False):
                hs = hs_f.clone().requires_grad_(True)
                w = ws.clone().requires_grad_(True)
                counts.clear(), calls.clear()
                loss, _ = L.vocab_parallel_linear_eopd_loss(
                    hs, w, ht_f, wt, tp_group=group, vocab_size=vocab, chunk_size=chunk,
                    reduce_hidden_grad=reduce,
                )  # fmt: skip
                fwd = dict(counts)
                counts.clear()
                (gh,) = torch.autograd.grad(loss.sum(), hs)
                bwd = dict(counts)
                gather = "all_gather_single" if hasattr(dist, "all_gather_single") else (
                    "all_gather_into_tensor"
                )  # fmt: skip
                assert fwd == ({gather: 1} if tp > 1 else {}), (chunk, fwd)
                assert bwd == ({"all_reduce": 1} if tp > 1 and reduce else {}), (chunk, bwd)
                assert calls == {"pair_stats": n_chunks, "pair_backward": n_chunks}, calls
                # one pass: 1 all-gather per chunk, the logits gradient made in forward; an
                # upstream gradient proportional to grad_weights recomputes nothing
                mask = torch.ones(SB, dtype=hs_f.dtype)
                mask[0] = 0
                for upstream, recomputed in ((3.0 * mask, 0), (mask + 1.0, n_chunks)):
                    hs = hs_f.clone().requires_grad_(True)
                    counts.clear(), calls.clear()
                    loss, _ = L.vocab_parallel_linear_eopd_loss(
                        hs, w, ht_f, wt, tp_group=group, vocab_size=vocab, chunk_size=chunk,
                        reduce_hidden_grad=reduce, grad_weights=mask,
                    )  # fmt: skip
                    assert dict(counts) == ({gather: n_chunks} if tp > 1 else {}), counts
                    counts.clear()
                    torch.autograd.grad((loss * upstream).sum(), hs)
                    assert dict(counts) == bwd, (chunk, counts)
                    want = {"pair_stats": n_chunks, "pair_backward": n_chunks + recomputed}
                    assert calls == want, (calls, want)
                if not reduce:  # the rank's partial sums to the full gradient
                    hs2 = hs_f.clone().requires_grad_(True)
                    loss2, _ = L.vocab_parallel_linear_eopd_loss(
                        hs2, ws, ht_f, wt, tp_group=group, vocab_size=vocab, chunk_size=chunk
                    )
                    (g_full,) = torch.autograd.grad(loss2.sum(), hs2)
                    R.assert_close(_tp_sum(gh, group), g_full, torch.float64, "grad", "partial")
            # the sampled objective in one pass: 1 all-gather per chunk, statistics once per
            # chunk; its backward recomputes only for an upstream gradient it was not told
            pay = L.vocab_parallel_linear_teacher_payload(
                ht_f, wt, y, 3, tp_group=group, vocab_size=vocab
            )
            cfg = L.ObjectiveConfig(name="eopd", top_k=3, fused_chunk_size=chunk)
            for upstream, recomputed in ((3.0 * mask, 0), (mask + 1.0, n_chunks)):
                hs = hs_f.clone().requires_grad_(True)
                w = ws.clone().requires_grad_(True)
                counts.clear(), calls.clear()
                loss, _ = L.linear_sampled_objective(
                    cfg, hs, w, y, torch.zeros(SB, dtype=hs.dtype), pay, tp_group=group,
                    vocab_size=vocab, grad_weights=mask,
                )  # fmt: skip
                assert dict(counts) == ({gather: n_chunks} if tp > 1 else {}), counts
                counts.clear()
                torch.autograd.grad((loss * upstream).sum(), (hs, w))
                assert dict(counts) == ({"all_reduce": 1} if tp > 1 else {}), counts
                want = {"single_stats": n_chunks, "single_backward": n_chunks + recomputed}
                assert calls == want, (calls, want)
            counts.clear(), calls.clear()
            L.vocab_parallel_linear_teacher_payload(
                ht_f, wt, y, 4, tp_group=group, vocab_size=vocab, chunk_size=chunk
            )
            assert sum(counts.values()) == (1 if tp > 1 else 0) and calls == {
                "single_stats": n_chunks
            }
    finally:
        for name, fn in orig.items():
            setattr(K, name, fn)


def _worker(rank, tp, vocab):
    group = dist.group.WORLD if tp > 1 else None
    v_pad = padded_vocab_size(vocab, tp)
    n = 0
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for temperature, chunk, tail in ((1.0, None, False), (0.7, 4, True)):
            if vocab > 1000 and (dtype == torch.bfloat16 or chunk):
                continue
            _check_exact(rank, tp, group, dtype, vocab, v_pad, temperature, chunk, 10 * tp + n)
            _check_sampled(rank, tp, group, dtype, vocab, v_pad, chunk or 7, tail, 7 + n)
            n += 1
    if tp > 1 and vocab < 1000:
        _check_collectives(rank, tp, group)
    return n, dict(_ERRORS)


# (true vocab size, cases per launch): 300 is padded Megatron-style to 384 / 512 / 512 at
# TP 1 / 2 / 4 (at TP 4 the last rank holds only padding); 32003 to 32128 (slow: the float64
# reference over 32k columns on every rank)
@pytest.mark.parametrize(
    "tp, vocab, cases",
    [(1, 300, 6), (2, 300, 6), (4, 300, 6)]
    + [pytest.param(tp, 32003, 2, marks=pytest.mark.slow) for tp in (1, 2, 4)],
)
def test_fused_matches_unfused_and_float64_reference(tp, vocab, cases):
    if tp == 1:  # no process group needed: run in this process (no spawn)
        _ERRORS.clear()
        results = [_worker(0, 1, vocab)]
    else:
        results = run_distributed(_worker, tp, vocab, timeout=600)
    assert [n for n, _ in results] == [cases] * tp
    for key, err in sorted(results[0][1].items()):  # shown with pytest -s (docs/losses.md)
        print(f"tp{tp} V={vocab} {key}: max abs diff {err:.2e}")


def test_collectives_and_chunks_tp1():
    """At TP 1 no collective at all; the kernels run once per chunk."""
    _check_collectives(0, 1, None)


def test_saved_for_backward_is_inputs_plus_per_token_values():
    """Autograd keeps only the inputs (same storage) and O(tokens) values: no logits."""
    n_tokens, v = 64, 2000
    hs = torch.randn(16, 4, 32, requires_grad=True)
    ws = torch.randn(v, 32, requires_grad=True)
    ht, wt = torch.randn(16, 4, 24), torch.randn(v, 24)
    y = torch.randint(0, v, (16, 4))
    inputs = {t.untyped_storage().data_ptr() for t in (hs, ws, ht, wt)}
    saved = []

    def pack(x):
        saved.append((x.untyped_storage().data_ptr(), x.numel()))
        return x

    cfg = L.ObjectiveConfig(top_k=8, chunk_size=16, fused_chunk_size=16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = L.vocab_parallel_linear_eopd_loss(hs, ws, ht, wt, chunk_size=16)
        pay = L.vocab_parallel_linear_teacher_payload(ht, wt, y, 8)
        loss2, _ = L.linear_sampled_objective(cfg, hs, ws, y, torch.zeros(16, 4), pay)
    assert saved
    for ptr, numel in saved:
        assert ptr in inputs or numel <= n_tokens * (cfg.top_k + 1), (ptr, numel)
    (loss.sum() + loss2.sum()).backward()
    assert torch.isfinite(hs.grad).all() and torch.isfinite(ws.grad).all()


def test_linear_exact_objective_variants():
    """Every exact variant but jsd through the fused path equals the unfused exact objective."""
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(4, 2, 10, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(50, 10, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(4, 2, 6, generator=g).double(), torch.randn(50, 6, generator=g).double()
    for name in ("opd", "eopd", "eopd_soft", "mix", "fkl"):
        cfg = L.ObjectiveConfig(
            name=name, form="exact", entropy_threshold=3.0, chunk_size=3, fused_chunk_size=3
        )
        b, mb = L.exact_objective(cfg, hs @ ws.T, ht @ wt.T, vocab_size=45)
        (gb,) = (torch.autograd.grad(b.sum(), (hs, ws)),)
        for gw_ in (None, torch.ones(4, 2, dtype=torch.float64)):  # two passes, one pass
            a, ma = L.linear_exact_objective(cfg, hs, ws, ht, wt, vocab_size=45, grad_weights=gw_)
            ga = torch.autograd.grad(a.sum(), (hs, ws))
            R.assert_close(a, b, torch.float64, what=name)
            assert torch.equal(ma["gate"], mb["gate"]), name
            for x, z in zip(ga, gb):
                R.assert_close(x, z, torch.float64, "grad", name)
    with pytest.raises(ValueError, match="jsd"):
        L.linear_exact_objective(L.ObjectiveConfig(name="jsd", form="exact"), hs, ws, ht, wt)


def _ids(h):
    return torch.zeros(h.shape[:-1] + (2,), dtype=torch.long)


def _row_sum(rows, logprobs, entropy):
    return logprobs.sum(-1) + entropy


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda h, w: L.vocab_parallel_linear_eopd_loss(h, w[:, :-1], h, w), "hidden size"),
        (lambda h, w: L.vocab_parallel_linear_eopd_loss(h, w, h, w[:-1]), "same tokens"),
        (lambda h, w: L.vocab_parallel_linear_eopd_loss(h, w.double(), h, w), "share a dtype"),
        (lambda h, w: L.vocab_parallel_linear_eopd_loss(h, w, h, w, vocab_size=99), "not fit"),
        (lambda h, w: L.vocab_parallel_linear_eopd_loss(h, w, h, w, chunk_size=0), "chunk_size"),
        (lambda h, w: L.vocab_parallel_linear_teacher_payload(h, w, h[..., 0].long(), 0), "k=0"),
        (lambda h, w: L.vocab_parallel_linear_teacher_payload(h, w, h.long(), 2), "shape"),
        (lambda h, w: L.vocab_parallel_linear_eopd_loss(h, w, h, w, temperature=0), "temperature"),
        (lambda h, w: L.linear_row_loss(h, w, _ids(h), _row_sum, h), "grad_weights must"),
        (lambda h, w: L.linear_row_loss(h, w, _ids(h)[..., 0], _row_sum, h[..., 0]), "ids must"),
        (lambda h, w: L.linear_row_loss(h, w, _ids(h), lambda r, lp, e: lp, h[..., 0]), "row_fn"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    h = torch.randn(3, 2, 4)
    w = torch.randn(10, 4)
    with pytest.raises(ValueError, match=match):
        call(h, w)


def test_loss_func_fused_with_the_output_layer():
    """megatron's loss_func on hidden states + output weight (sampled and exact forms) equals the
    loss_func on logits: token sum, reported metrics and gradients to hidden and weight."""
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(3, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)  # [b, s, h]
    ws = torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(3, 5, 8, generator=g).double(), torch.randn(64, 8, generator=g).double()
    y = torch.randint(0, 60, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    payload = L.vocab_parallel_linear_teacher_payload(ht, wt, y, 4, vocab_size=60)
    old = payload.token_logprobs + 0.2
    for form, teacher_u, teacher_f in (
        ("sampled", payload, payload),
        ("exact", ht @ wt.T, (ht, wt)),
    ):
        cfg = L.ObjectiveConfig(name="eopd", form=form, top_k=4, entropy_threshold=3.0)
        out = []
        for fused in (False, True):
            mb = L.DistillMicroBatch(y, mask, teacher_f if fused else teacher_u, old)
            fn = L.make_loss_func(cfg, mb, vocab_size=60, output_weight=ws if fused else None)
            loss_sum, n, rep = fn(hs if fused else hs @ ws.T)
            out.append((loss_sum, n, rep, torch.autograd.grad(loss_sum * 0.5, (hs, ws))))
        (lu, nu, ru, gu), (lf, nf, rf, gf) = out
        R.assert_close(lf, lu, torch.float64, what=form)
        assert int(nf) == int(nu) and rf.keys() == ru.keys()
        for key in ru:
            R.assert_close(rf[key], ru[key], torch.float32, what=f"{form} {key}")
        for a, b in zip(gf, gu):
            R.assert_close(a, b, torch.float64, "grad", form)


def test_one_pass_forms_make_no_gradient_without_autograd(monkeypatch):
    """Under no_grad (and for inputs that require no grad) the one-pass forms (grad_weights) make
    no gradient in forward (an evaluation forward used to pay for one: the backward kernels ran
    and d weight was allocated) and give the two-pass values."""
    calls = Counter()
    for name in ("single_backward", "pair_backward"):
        orig = getattr(K, name)

        def counted(*args, _name=name, _orig=orig):
            calls[_name] += 1
            return _orig(*args)

        monkeypatch.setattr(K, name, counted)
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(5, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(40, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(5, 3, 8, generator=g).double(), torch.randn(40, 8, generator=g).double()
    y = torch.randint(0, 37, (5, 3), generator=g)
    pay = L.vocab_parallel_linear_teacher_payload(ht, wt, y, 4, vocab_size=37)
    old = torch.full((5, 3), -3.0, dtype=torch.float64)
    mask = torch.ones(5, 3, dtype=torch.float64)
    cfg = L.ObjectiveConfig(name="eopd", top_k=4, fused_chunk_size=4)
    ref_s, _ = L.linear_sampled_objective(cfg, hs, ws, y, old, pay, vocab_size=37)
    ref_e, _ = L.vocab_parallel_linear_eopd_loss(hs, ws, ht, wt, vocab_size=37, chunk_size=4)
    for ctx, h in ((torch.no_grad, hs), (contextlib.nullcontext, hs.detach())):
        with ctx():
            s, _ = L.linear_sampled_objective(
                cfg, h, ws.detach() if h is not hs else ws, y, old, pay, vocab_size=37,
                grad_weights=mask,
            )  # fmt: skip
            e, _ = L.vocab_parallel_linear_eopd_loss(
                h, ws.detach() if h is not hs else ws, ht, wt, vocab_size=37, chunk_size=4,
                grad_weights=mask,
            )  # fmt: skip
        assert not s.requires_grad and not e.requires_grad
        R.assert_close(s, ref_s, torch.float64, what="sampled")
        R.assert_close(e, ref_e, torch.float64, what="exact")
    assert calls == Counter(), calls
    s, _ = L.linear_sampled_objective(cfg, hs, ws, y, old, pay, vocab_size=37, grad_weights=mask)
    assert calls["single_backward"] == 4  # with autograd: one per chunk, in forward (15 / 4)
