"""Independent float64 references computed on the gathered (full) vocabulary, and the tolerances."""

from __future__ import annotations

import torch

TOL = {
    # dtype: (value atol/rtol, gradient atol/rtol)
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float64: (1e-10, 1e-10),
}


def assert_close(actual, expected, dtype, kind="value", what=""):
    """One tolerance helper: fp32 1e-5 values / 1e-4 gradients, bf16 1e-2."""
    tol = TOL[dtype][0 if kind == "value" else 1]
    actual = actual.double()
    expected = expected.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite pattern differs"
    torch.testing.assert_close(
        actual[finite], expected[finite], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


def full_logits(shape, v_pad, seed, scale=3.0, dtype=torch.float32):
    """Deterministic full [*shape, v_pad] logits, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, v_pad, generator=g, dtype=torch.float64) * scale).to(dtype)


def shard(full, rank, tp):
    w = full.shape[-1] // tp
    return full[..., rank * w : (rank + 1) * w].contiguous()


def ref_logp(full, vocab_size, temperature=1.0):
    """float64 log-softmax over the real vocabulary [..., V]."""
    return torch.log_softmax(full[..., :vocab_size].double() / temperature, dim=-1)


def _plogq(p_log, q_log):
    p = p_log.exp()
    return torch.where(p > 0, p * q_log, torch.zeros_like(p))


def ref_entropy(lp):
    return -_plogq(lp, lp).sum(-1)


def ref_kl(lp, lq):
    """KL(p || q) from log-probs, 0 * log 0 = 0."""
    return (_plogq(lp, lp) - _plogq(lp, lq)).sum(-1)


def ref_grad(fn, full, vocab_size, rank, tp):
    """Gradient of fn(float64 full logits) w.r.t. this rank's shard (padding columns get 0)."""
    x = full.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    g[..., vocab_size:] = 0
    return shard(g, rank, tp)
