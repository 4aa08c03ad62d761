"""The fused EOPD loss on a real megatron GPTModel at TP 2: hidden states taken through
`losses.output_layer.hidden_states_output` give the same loss and the same gradient on every
student parameter as the logits path (model logits -> vocab_parallel_eopd_loss), for an untied
student and a tied teacher / tied student."""

from __future__ import annotations

import torch

from tests.dist import run_distributed
from tests.models import helpers


def _worker(rank, tp):
    from megatron.core import parallel_state as ps

    from megatron_eaopd import losses as L
    from megatron_eaopd.losses.output_layer import hidden_states_output
    from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, 1, seed=5)
    try:
        out = []
        for s_name, t_name in (("tiny-student", "tiny-teacher"), ("tiny-teacher", "tiny-student")):
            s_cfg, t_cfg = helpers.preset(s_name), helpers.preset(t_name)
            student, teacher = build_model(s_cfg)[0], build_model(t_cfg)[0]
            init_weights_layout_invariant([student], 1)
            init_weights_layout_invariant([teacher], 2)
            vocab = min(s_cfg.vocab_size, t_cfg.vocab_size)
            batch = helpers.make_batches(1, 2, 6, vocab, seed=3)[0]
            args = (batch["tokens"], batch["position_ids"], None)
            mask = torch.ones(2, 6)
            mask[0, :2] = 0
            with torch.no_grad():
                t_logits = teacher(*args)
                with hidden_states_output(teacher) as t_weight:
                    t_hidden = teacher(*args)
            kw = dict(entropy_threshold=1.0, fkl_coef=0.5, vocab_size=vocab)

            def grads(model=student):
                g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                model.zero_grad()
                return g

            loss_u, _ = L.vocab_parallel_eopd_loss(student(*args), t_logits, **kw)
            (loss_u * mask).sum().backward()
            g_u = grads()
            for grad_weights in (None, mask):
                with hidden_states_output(student) as s_weight:
                    hidden = student(*args)
                assert hidden.shape == (2, 6, s_cfg.hidden_size), hidden.shape
                loss_f, _ = L.vocab_parallel_linear_eopd_loss(
                    hidden, s_weight, t_hidden, t_weight, chunk_size=5, grad_weights=grad_weights,
                    **kw,
                )  # fmt: skip
                (loss_f * mask).sum().backward()
                g_f = grads()
                torch.testing.assert_close(loss_f, loss_u, atol=1e-5, rtol=1e-5)
                assert g_f.keys() == g_u.keys() and len(g_u) > 5
                for name in g_u:
                    torch.testing.assert_close(g_f[name], g_u[name], atol=1e-5, rtol=1e-4,
                                               msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip
            assert not isinstance(student.output_layer, type(None))
            assert type(student.output_layer).__name__ != "_HiddenStates"
            out.append(float(loss_u.sum()))
        return out
    finally:
        ps.destroy_model_parallel()


def test_fused_loss_on_gpt_model_tp2():
    results = run_distributed(_worker, 2, timeout=300)
    assert results[0] == results[1]
