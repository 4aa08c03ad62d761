"""The losses on CUDA tensors (run on a GPU machine: pytest -m gpu tests/losses/test_cuda.py).

Same float64 references as the CPU tests; both the eager and the torch.compile (Triton) kernels.
"""

from __future__ import annotations

import pytest
import torch

from megatron_eaopd import losses as L
from tests.losses import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_on_cuda_match_float64_reference(monkeypatch, compiled, dtype):
    monkeypatch.setenv("EAOPD_COMPILE", compiled)
    monkeypatch.setenv("EAOPD_CHUNK_ELEMS", str(1 << 16))  # several row chunks
    monkeypatch.setenv("EAOPD_COMPILE_MIN_ELEMS", "0")
    vocab, v_pad, sb = 32003, 32128, (8, 4)
    fs = R.full_logits(sb, v_pad, 1, dtype=dtype)
    ft = R.full_logits(sb, v_pad, 2, scale=1.0, dtype=dtype)
    fs[..., vocab:], ft[..., vocab:] = 40.0, -40.0
    s = fs.cuda().requires_grad_(True)
    t = ft.cuda()
    ls, lt = R.ref_logp(fs, vocab, 0.7), R.ref_logp(ft, vocab, 0.7)
    ht = R.ref_entropy(lt)
    tau = float(ht.flatten().sort().values[15:17].mean())
    kw = dict(vocab_size=vocab, temperature=0.7)
    loss, m = L.vocab_parallel_eopd_loss(s, t, entropy_threshold=tau, **kw)
    assert loss.is_cuda and m["teacher_entropy"].is_cuda
    gate = (ht >= tau).double()
    ref = R.ref_kl(ls, lt) + gate * R.ref_kl(lt, ls)
    R.assert_close(loss.cpu(), ref, dtype, what="eopd loss cuda")
    R.assert_close(m["teacher_entropy"].cpu(), ht, dtype, what="teacher entropy cuda")
    (g,) = torch.autograd.grad(loss.sum(), s)

    def ref_fn(f):
        lsf = R.ref_logp(f, vocab, 0.7)
        return (R.ref_kl(lsf, lt) + gate * R.ref_kl(lt, lsf)).sum()

    R.assert_close(g.cpu(), R.ref_grad(ref_fn, fs, vocab, 0, 1), dtype, "grad", "eopd grad cuda")

    y = torch.randint(0, vocab, sb, generator=torch.Generator().manual_seed(3))
    pay = L.vocab_parallel_teacher_payload(t, y.cuda(), 16, **kw)
    R.assert_close(pay.entropy.cpu(), ht, dtype, what="payload entropy cuda")
    R.assert_close(pay.token_logprobs.cpu(), lt.gather(-1, y[..., None])[..., 0], dtype)
    R.assert_close(pay.topk_logprobs.cpu(), lt.topk(16, dim=-1).values, dtype)
    lp = L.vocab_parallel_token_logprobs(s, y.cuda(), **kw)
    (g,) = torch.autograd.grad(lp.sum(), s)
    gref = R.ref_grad(
        lambda f: R.ref_logp(f, vocab, 0.7).gather(-1, y[..., None]).sum(), fs, vocab, 0, 1
    )
    R.assert_close(g.cpu(), gref, dtype, "grad", "token logprob grad cuda")
    from megatron_eaopd.losses import _kernels

    assert not _kernels._compile_broken, "torch.compile fell back to eager on CUDA"
