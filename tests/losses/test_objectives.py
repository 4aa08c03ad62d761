"""The objectives (paper's sampled form, exact variants, JSD) and the megatron loss_func."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_eaopd import losses as L
from megatron_eaopd.parallel.vocab import padded_vocab_size
from tests.dist import run_distributed
from tests.losses import reference as R

SB = (5, 2)


def _ref_sampled(fs, ft, vocab, y, old, k, tau, alpha, eps, tail, top_ids=None):
    """float64 reference of the paper's objective on the full vocabulary; returns a callable.

    top_ids: the top-k set to use (bf16 logits have exact ties, and any tied choice is a correct
    top-k); its log-probs must equal the reference top-k values.
    """
    lt = R.ref_logp(ft, vocab)
    ht = R.ref_entropy(lt)
    top_v, top_i = lt.topk(k, dim=-1)
    if top_ids is not None:
        assert torch.equal(lt.gather(-1, top_ids), top_v), "top-k set differs beyond ties"
        top_i = top_ids
    gate = (ht >= tau).double()

    def fn(f):
        ls = R.ref_logp(f, vocab)
        lp_y = ls.gather(-1, y[..., None])[..., 0]
        ratio = torch.exp(lp_y - old)
        adv = lt.gather(-1, y[..., None])[..., 0] - old
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        lp_top = ls.gather(-1, top_i)
        if tail:
            q = top_v.exp()
            q_tail, p_tail = 1 - q.sum(-1), 1 - lp_top.exp().sum(-1)
            fkl = (q * (top_v - lp_top)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
        else:
            lq = torch.log_softmax(top_v, -1)
            fkl = (lq.exp() * (lq - lp_top)).sum(-1)
        return pg + alpha * gate * fkl

    return fn, ht


def _sampled_worker(rank, tp):
    group = torch.distributed.group.WORLD if tp > 1 else None
    for vocab, v_pad, dtype in ((32003, padded_vocab_size(32003, tp), torch.float32),
                                (64 * tp, 64 * tp, torch.bfloat16)):  # fmt: skip
        fs = R.full_logits(SB, v_pad, 1, dtype=dtype)
        ft = R.full_logits(SB, v_pad, 2, scale=1.0, dtype=dtype)
        y = torch.randint(0, vocab, SB, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(SB, generator=torch.Generator().manual_seed(4)).double() * 0.4
        old = R.ref_logp(fs, vocab).gather(-1, y[..., None])[..., 0] + noise
        for tail in (False, True):
            k = 16
            s = R.shard(fs, rank, tp).requires_grad_(True)
            t = R.shard(ft, rank, tp)
            kw = dict(tp_group=group, vocab_size=vocab)
            payload = L.vocab_parallel_teacher_payload(t, y, k, **kw)
            ht = R.ref_entropy(R.ref_logp(ft, vocab))
            tau = float(ht.flatten().sort().values[4:6].mean())
            top = payload.topk_ids
            ref_fn, ht = _ref_sampled(fs, ft, vocab, y, old, k, tau, 0.5, 0.2, tail, top)
            cfg = L.ObjectiveConfig(
                name="eopd", entropy_threshold=tau, fkl_coef=0.5, top_k=k, tail_bucket=tail
            )
            loss, m = L.sampled_objective(cfg, s, y, old.float(), payload, **kw)
            tag = f"tp{tp} {dtype} tail={tail}"
            R.assert_close(loss, ref_fn(fs), dtype, what=f"sampled loss {tag}")
            assert 0 < m["gate"].sum() < m["gate"].numel()
            assert m["clip_frac"].sum() > 0, "no token was clipped: test does not cover clipping"
            (g,) = torch.autograd.grad(loss.sum(), s)
            gref = R.ref_grad(lambda f, fn=ref_fn: fn(f).sum(), fs, vocab, rank, tp)
            R.assert_close(g, gref, dtype, "grad", f"sampled grad {tag}")

    # second code path: top-k forward KL with k = V equals the exact full-vocabulary FKL
    vocab = 40 * tp
    fs, ft = R.full_logits(SB, vocab, 5), R.full_logits(SB, vocab, 6)
    s = R.shard(fs, rank, tp).requires_grad_(True)
    t = R.shard(ft, rank, tp)
    y = torch.zeros(SB, dtype=torch.long)
    payload = L.vocab_parallel_teacher_payload(t, y, vocab, tp_group=group)
    lp_top = L.vocab_parallel_gather_logprobs(s, payload.topk_ids, tp_group=group)
    fkl_topk = L.topk_forward_kl(lp_top, payload.topk_logprobs)
    fkl_exact = L.vocab_parallel_kl_terms(s, t, tp_group=group)["fkl"]
    torch.testing.assert_close(fkl_topk, fkl_exact, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad(fkl_topk.sum(), s)
    (g2,) = torch.autograd.grad(fkl_exact.sum(), s)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)

    # exact variants and JSD against float64 references (padded vocab)
    vocab, v_pad = 32003, padded_vocab_size(32003, tp)
    fs, ft = R.full_logits(SB, v_pad, 7), R.full_logits(SB, v_pad, 8, scale=1.0)
    s = R.shard(fs, rank, tp).requires_grad_(True)
    t = R.shard(ft, rank, tp)
    lt = R.ref_logp(ft, vocab)
    ht = R.ref_entropy(lt)
    tau = float(ht.flatten().sort().values[4:6].mean())
    soft = torch.sigmoid((ht - tau) / 0.3)
    refs = {
        "opd": lambda ls: R.ref_kl(ls, lt),
        "eopd": lambda ls: R.ref_kl(ls, lt) + (ht >= tau).double() * R.ref_kl(lt, ls),
        "eopd_soft": lambda ls: R.ref_kl(ls, lt) + soft * R.ref_kl(lt, ls),
        "mix": lambda ls: 0.75 * R.ref_kl(ls, lt) + 0.25 * R.ref_kl(lt, ls),
        "fkl": lambda ls: R.ref_kl(lt, ls),
        "jsd": lambda ls: _ref_jsd(ls, lt, 0.3),
    }
    for name, ref in refs.items():
        cfg = L.ObjectiveConfig(
            name=name, form="exact", entropy_threshold=tau, gate_width=0.3, mix_weight=0.25,
            jsd_beta=0.3,
        )  # fmt: skip
        loss, _ = L.exact_objective(cfg, s, t, tp_group=group, vocab_size=vocab)
        R.assert_close(loss, ref(R.ref_logp(fs, vocab)), torch.float32, what=f"{name} tp{tp}")
        (g,) = torch.autograd.grad(loss.sum(), s)
        gref = R.ref_grad(lambda f, fn=ref: fn(R.ref_logp(f, vocab)).sum(), fs, vocab, rank, tp)
        R.assert_close(g, gref, torch.float32, "grad", f"{name} grad tp{tp}")
    return True


def _ref_jsd(ls, lt, beta):
    lm = torch.logaddexp(lt + torch.log(torch.tensor(beta)), ls + torch.log1p(torch.tensor(-beta)))
    return beta * R.ref_kl(lt, lm) + (1 - beta) * R.ref_kl(ls, lm)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_objectives_match_float64_reference(tp):
    assert run_distributed(_sampled_worker, tp, timeout=300) == [True] * tp


def test_loss_func_normalises_by_global_valid_tokens():
    """Two micro-batches through loss_func, summed and divided by the total token count as
    megatron does with calculate_per_token_loss=True, equal the token mean over the batch."""
    vocab, k = 50, 4
    cfg = L.ObjectiveConfig(name="eopd", top_k=k, entropy_threshold=3.0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, vocab, generator=g, requires_grad=True)  # [b, s, V]
    teacher = torch.randn(4, 6, vocab, generator=g)
    y = torch.randint(0, vocab, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    old = L.vocab_parallel_token_logprobs(logits.detach(), y) + 0.1
    payload = L.vocab_parallel_teacher_payload(teacher, y, k)

    full_loss, full_m = L.sampled_objective(cfg, logits, y, old, payload)
    ref = full_loss[mask].sum() / mask.sum()
    (g_ref,) = torch.autograd.grad(ref, logits)

    total, count, reported = 0.0, 0, []
    for rows in (slice(0, 1), slice(1, 4)):
        sub = L.TeacherPayload(*(f[rows] for f in payload))
        mb = L.DistillMicroBatch(y[rows], mask[rows], sub, old[rows])
        loss_sum, n, rep = L.make_loss_func(cfg, mb)(logits[rows])
        total, count = total + loss_sum, count + int(n)
        reported.append(rep)
    (g_mb,) = torch.autograd.grad(total / count, logits)
    torch.testing.assert_close(total.detach() / count, ref.detach())
    torch.testing.assert_close(g_mb, g_ref)
    assert bool((g_mb[~mask] == 0).all()), "masked tokens received gradient"
    metrics = L.reduce_metrics(reported)
    assert metrics["loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    ht = full_m["teacher_entropy"]
    gate = (ht >= 3.0) & mask
    assert metrics["gate"] == pytest.approx(float(gate.sum() / mask.sum()))
    fkl_gated = float(full_m["fkl"][gate].sum() / gate.sum()) if gate.any() else 0.0
    assert metrics["fkl_gated"] == pytest.approx(fkl_gated, rel=1e-5)
    assert metrics["teacher_high_entropy"] == pytest.approx(float(gate.sum() / mask.sum()))


def _sampled_case(vocab=50, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 6, vocab, generator=g, requires_grad=True)  # [b, s, V]
    y = torch.randint(0, vocab, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    mask[0, 0] = False
    old = L.vocab_parallel_token_logprobs(logits.detach(), y) + 0.1
    payload = L.vocab_parallel_teacher_payload(torch.randn(3, 6, vocab, generator=g), y, k)
    return logits, y, mask, old, payload


@pytest.mark.parametrize("fused", [False, True])
def test_loss_func_ignores_non_finite_old_logprobs_at_masked_positions(fused):
    """A NaN or -inf old log-prob where the loss mask is False gives the loss and gradient of a
    finite one (it reached the gradient through the masked-out PPO term: 0 * inf = NaN); at a
    trained position it is refused with its position."""
    cfg = L.ObjectiveConfig(name="eopd", top_k=4, entropy_threshold=3.0)
    logits, y, mask, old, payload = _sampled_case()
    weight = torch.randn(50, 8, requires_grad=True)
    hidden = torch.randn(3, 6, 8, requires_grad=True)

    def run(old_values):
        mb = L.DistillMicroBatch(y, mask, payload, old_values)
        if fused:
            loss, _, rep = L.make_loss_func(cfg, mb, output_weight=weight)(hidden)
            return (loss, *torch.autograd.grad(loss, (hidden, weight))), rep
        loss, _, rep = L.make_loss_func(cfg, mb)(logits)
        return (loss, *torch.autograd.grad(loss, logits)), rep

    (ref, *ref_grads), ref_rep = run(old)
    for bad in (math.nan, -math.inf, math.inf):
        poisoned = old.clone()
        poisoned[0, 0] = bad
        (loss, *grads), rep = run(poisoned)
        assert float(loss) == float(ref)
        for a, b in zip(grads, ref_grads):
            assert bool(torch.isfinite(a).all()) and torch.equal(a, b)
        assert {k: v.tolist() for k, v in rep.items()} == {
            k: v.tolist() for k, v in ref_rep.items()
        }
        trained = old.clone()
        trained[1, 2] = bad
        assert bool(mask[1, 2])
        with pytest.raises(ValueError, match=r"at a trained position \(\[1, 2\]"):
            run(trained)


@pytest.mark.parametrize("fused", [False, True])
def test_fkl_on_teacher_forced_data_needs_no_old_logprobs(fused):
    """Objective fkl without old log-probs (offline data): the loss and gradient of the same
    objective with any old log-probs (its PPO term has weight 0), and no PPO metrics; every
    other sampled objective refuses to run without them."""
    cfg = L.ObjectiveConfig(name="fkl", top_k=4)
    logits, y, mask, old, payload = _sampled_case(seed=2)
    weight = torch.randn(50, 8, requires_grad=True)
    hidden = torch.randn(3, 6, 8, requires_grad=True)

    def run(objective, old_values):
        mb = L.DistillMicroBatch(y, mask, payload, old_values)
        inputs = (hidden, weight) if fused else (logits,)
        kw = {"output_weight": weight} if fused else {}
        loss, _, rep = L.make_loss_func(objective, mb, **kw)(inputs[0])
        return float(loss), torch.autograd.grad(loss, inputs), rep

    loss, grads, rep = run(cfg, None)
    ref_loss, ref_grads, ref_rep = run(cfg, old)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert set(ref_rep) - set(rep) == {"pg_loss", "ratio", "advantage", "clip_frac",
                                       "rkl_sampled"}  # fmt: skip
    for key in rep:
        assert rep[key].tolist() == pytest.approx(ref_rep[key].tolist(), rel=1e-6), key
    with pytest.raises(ValueError, match="'eopd' in the sampled form needs old_logprobs"):
        run(L.ObjectiveConfig(name="eopd", top_k=4), None)
    if not fused:  # teacher logits (attach_logits) given to the sampled form: fkl included
        for name in ("fkl", "eopd"):
            mb = L.DistillMicroBatch(y, mask, torch.randn(3, 6, 50), old)
            want = rf"'{name}' in the sampled form needs a TeacherPayload .* it holds the teach"
            with pytest.raises(ValueError, match=want + r"er's logits .* eopd_exact"):
                L.make_loss_func(L.ObjectiveConfig(name=name, top_k=4), mb)(logits)


def test_exact_form_refuses_a_teacher_padded_otherwise():
    """A student padded Megatron-LM's way (V_pad 256 at TP 2) beside an EOPDTeacher padded to
    1024: a shape error naming neither padding nor fix."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 128, generator=g, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    y = torch.zeros(2, 5, dtype=torch.long)
    cfg = L.ObjectiveConfig(name="eopd", form="exact")
    mb = L.DistillMicroBatch(y, mask, torch.randn(2, 5, 512, generator=g), None)
    with pytest.raises(ValueError, match=r"128 columns and the teacher's 512: .*padded_vocab_size"):
        L.make_loss_func(cfg, mb, vocab_size=200)(logits)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(128, 8, generator=g)
    mb = L.DistillMicroBatch(y, mask, (hidden, torch.randn(512, 8, generator=g)), None)
    with pytest.raises(ValueError, match=r"--make-vocab-size-divisible-by"):
        L.make_loss_func(cfg, mb, vocab_size=200, output_weight=weight)(hidden)


def test_loss_func_exact_forms_including_jsd():
    """loss_func with the teacher's logits (exact form): token sum and reported metrics, for an
    objective with a gate and for jsd (which has none)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 30, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 30, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    y = torch.zeros(2, 5, dtype=torch.long)
    for name, ref in (
        ("eopd", lambda: L.vocab_parallel_eopd_loss(logits, teacher)[0]),
        ("jsd", lambda: L.vocab_parallel_jsd(logits, teacher, beta=0.5)["jsd"]),
    ):
        cfg = L.ObjectiveConfig(name=name, form="exact")
        loss_sum, n, rep = L.make_loss_func(cfg, L.DistillMicroBatch(y, mask, teacher))(logits)
        torch.testing.assert_close(loss_sum, ref()[mask].sum())
        assert int(n) == int(mask.sum())
        assert ("fkl_gated" in rep) == (name != "jsd")
        metrics = L.reduce_metrics([rep])
        assert metrics["teacher_high_entropy"] >= 0 and math.isfinite(metrics["loss"])


def test_objective_config_errors():
    with pytest.raises(ValueError, match="not one of"):
        L.ObjectiveConfig(name="kl")
    with pytest.raises(ValueError, match="form='exact'"):
        L.ObjectiveConfig(name="jsd")
    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        L.check_megatron_config(type("C", (), {"calculate_per_token_loss": False})())
    with pytest.raises(ValueError, match="beta"):
        L.vocab_parallel_jsd(torch.randn(2, 5), torch.randn(2, 5), beta=1.0)
