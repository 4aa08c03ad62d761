"""The entropy gate's comparison (H >= tau by default, H > tau with gate_strict) on exact ties, and
the row chunking (`chunk_size`): it changes how often the kernels run, never the result.

Ties are built from teachers whose distribution is uniform over m of the vocabulary's columns
(the rest -inf): their entropy is ln m exactly (one-hot: 0), so tau = ln m sits on a tie.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from megatron_eaopd import losses as L
from megatron_eaopd.config import load_config, objective_kwargs
from megatron_eaopd.losses import _kernels as K
from tests.losses import reference as R

V = 16
SUPPORT = (1, 2, 4, 8)  # teacher row i is uniform over SUPPORT[i] columns: entropy ln SUPPORT[i]


def _tie_teacher(dtype=torch.float64) -> torch.Tensor:
    """[4, 1, V] logits; row i uniform over its first SUPPORT[i] columns (shifted, so that the
    maxima differ from row to row), -inf elsewhere."""
    rows = []
    for i, m in enumerate(SUPPORT):
        row = torch.full((V,), -math.inf, dtype=torch.float64)
        row[:m] = 0.25 * i
        rows.append(row)
    return torch.stack(rows)[:, None, :].to(dtype)


def _student(dtype=torch.float64) -> torch.Tensor:
    return R.full_logits((4, 1), V, 7, scale=1.0, dtype=dtype)


@pytest.mark.parametrize(
    "tau, strict, expected",
    [
        (math.log(4), False, [0, 0, 1, 1]),  # the tie (H = ln 4) is gated in
        (math.log(4), True, [0, 0, 0, 1]),  # ... and out with the strict form
        (0.0, False, [1, 1, 1, 1]),  # tau = 0 takes every token, the one-hot one too
        (0.0, True, [0, 1, 1, 1]),
        (math.log(2), False, [0, 1, 1, 1]),
        (math.log(8), True, [0, 0, 0, 0]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gate_on_exact_ties(tau, strict, expected, dtype):
    t = _tie_teacher(dtype)
    s = _student(dtype).requires_grad_(True)
    want = torch.tensor(expected, dtype=torch.float64)[:, None]

    # the exact loss: gate, loss and gradient against the float64 reference
    loss, m = L.vocab_parallel_eopd_loss(
        s, t, entropy_threshold=tau, fkl_coef=0.5, gate_strict=strict
    )
    torch.testing.assert_close(
        m["teacher_entropy"].double(),
        torch.tensor([math.log(k) for k in SUPPORT], dtype=torch.float64)[:, None],
        rtol=0,
        atol=1e-6 if dtype == torch.float32 else 1e-15,
    )
    assert torch.equal(m["gate"].double(), want)
    ls, lt = R.ref_logp(s.detach(), V), R.ref_logp(t, V)
    ref = R.ref_kl(ls, lt) + 0.5 * want * R.ref_kl(lt, ls)
    R.assert_close(loss, ref, dtype, what="eopd loss at a tie")

    # the objectives (exact form) and the megatron loss_func's high-entropy metrics
    cfg = L.ObjectiveConfig(name="eopd", form="exact", entropy_threshold=tau, gate_strict=strict)
    _, metrics = L.exact_objective(cfg, s, t)
    assert torch.equal(metrics["gate"].double(), want)
    mb = L.DistillMicroBatch(
        token_ids=torch.zeros(4, 1, dtype=torch.long),
        loss_mask=torch.ones(4, 1, dtype=torch.bool),
        teacher=t,
    )
    _, _, reported = L.make_loss_func(cfg, mb)(s)
    num, den = reported["teacher_high_entropy"].tolist()
    assert (num, den) == (float(sum(expected)), 4.0)


def test_sampled_form_gate_follows_the_option():
    t = _tie_teacher()
    s = _student()
    payload = L.vocab_parallel_teacher_payload(t, torch.zeros(4, 1, dtype=torch.long), k=2)
    old = torch.zeros(4, 1, dtype=torch.float64)
    y = torch.zeros(4, 1, dtype=torch.long)
    for strict, expected in ((False, [0, 0, 1, 1]), (True, [0, 0, 0, 1])):
        cfg = L.ObjectiveConfig(name="eopd", entropy_threshold=math.log(4), gate_strict=strict)
        _, metrics = L.sampled_objective(cfg, s, y, old, payload)
        assert metrics["gate"].squeeze(-1).tolist() == expected


def test_entropy_gate_soft_form_ignores_strict():
    h = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(L.entropy_gate(h, 0.5, 0.1), L.entropy_gate(h, 0.5, 0.1, strict=True))
    assert L.entropy_gate(h, 0.5).tolist() == [0.0, 1.0, 1.0]
    assert L.entropy_gate(h, 0.5, strict=True).tolist() == [0.0, 0.0, 1.0]


def test_config_threads_gate_and_chunk_size():
    cfg = load_config(None, ["loss.gate_strict=true", "loss.chunk_size=4"])
    oc = L.ObjectiveConfig(**objective_kwargs(cfg.loss))
    assert oc.gate_strict is True and oc.chunk_size == 4
    default = L.ObjectiveConfig(**objective_kwargs(load_config(None).loss))
    assert default.gate_strict is False and default.chunk_size is None


_KERNELS = ("single_stats", "single_backward", "pair_stats", "pair_backward", "jsd_partials",
            "jsd_backward")  # fmt: skip


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each shard-local kernel (the row chunks)."""
    calls: Counter = Counter()
    for name in _KERNELS:
        fn = getattr(K, name)

        def counted(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(K, name, counted)
    return calls


def _all_losses(chunk_size):
    """Every objective on [5, 3, 40] fp32 logits (15 tokens): values and student gradients."""
    s = R.full_logits((5, 3), 40, 1).requires_grad_(True)
    t = R.full_logits((5, 3), 40, 2, scale=1.0)
    y = torch.randint(0, 37, (5, 3), generator=torch.Generator().manual_seed(3))
    out = []
    payload = L.vocab_parallel_teacher_payload(t, y, k=4, vocab_size=37, chunk_size=chunk_size)
    out += list(payload)
    old = payload.token_logprobs + 0.1
    for name, form in (("eopd", "sampled"), ("eopd", "exact"), ("jsd", "exact")):
        cfg = L.ObjectiveConfig(
            name=name, form=form, top_k=4, entropy_threshold=2.0, chunk_size=chunk_size
        )
        if form == "sampled":
            loss, _ = L.sampled_objective(cfg, s, y, old, payload, vocab_size=37)
        else:
            loss, _ = L.exact_objective(cfg, s, t, vocab_size=37)
        (grad,) = torch.autograd.grad(loss.sum(), s)
        out += [loss, grad]
    return out


def test_chunk_size_changes_the_chunking_not_the_result(kernel_calls):
    results = {}
    counts = {}
    for chunk in (None, 1, 4, 15, 100):
        kernel_calls.clear()
        results[chunk] = _all_losses(chunk)
        counts[chunk] = dict(kernel_calls)
    rows = 15
    for chunk, per_call in counts.items():
        n = 1 if chunk is None else math.ceil(rows / chunk)
        # payload + sampled: 2 single_stats passes, 1 single_backward; exact eopd: pair_stats,
        # pair_backward; jsd: pair_stats, jsd_partials, jsd_backward -- each n chunks per pass
        assert per_call == {
            "single_stats": 2 * n, "single_backward": n, "pair_stats": 2 * n,
            "pair_backward": n, "jsd_partials": n, "jsd_backward": n,
        }, chunk  # fmt: skip
    for chunk in (1, 4, 15, 100):
        for a, b in zip(results[chunk], results[None]):
            R.assert_close(a.float() if a.is_floating_point() else a.double(),
                           b.float() if b.is_floating_point() else b.double(), torch.float32,
                           what=f"chunk_size={chunk}")  # fmt: skip


def test_chunk_size_through_the_loss_func(kernel_calls):
    s = R.full_logits((5, 3), 40, 1).requires_grad_(True)
    t = R.full_logits((5, 3), 40, 2, scale=1.0)
    mb = L.DistillMicroBatch(
        token_ids=torch.zeros(5, 3, dtype=torch.long),
        loss_mask=torch.ones(5, 3, dtype=torch.bool),
        teacher=t,
    )
    cfg = load_config(None, ["loss.objective=eopd_exact", "loss.chunk_size=2"])
    oc = L.ObjectiveConfig(**objective_kwargs(cfg.loss))
    loss, _, _ = L.make_loss_func(oc, mb, vocab_size=37)(s)
    loss.backward()
    assert kernel_calls["pair_stats"] == 8 and kernel_calls["pair_backward"] == 8  # ceil(15 / 2)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        L.ObjectiveConfig(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        L.vocab_parallel_entropy(torch.zeros(2, 3, 4), chunk_size=0)
