"""FastDecoder's forward equals megatron-core's forward of the same weights, for every norm layout
it handles differently: RMSNorm gains folded into the CPU weight copies and the QK RMSNorms fused
with RoPE (the Qwen3 layout), RMSNorm without QK norms (RoPE of queries and keys in one pass),
LayerNorm everywhere (the norm modules run as they are), and QK norms it cannot fuse (RMSNorm
QK norms with another eps than each other). TP 1 and TP 2, with the prefill, single-position
decode, per-row decode and per-row prefill paths; float64 is not used: these are the fp32
rollouts."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

VOCAB = 40

LAYOUTS = {
    "rms_qk": dict(normalization="RMSNorm", qk_layernorm=True),
    "rms": dict(normalization="RMSNorm", qk_layernorm=False),
    "layernorm_qk": dict(normalization="LayerNorm", qk_layernorm=True),
    "rms_qk_unfused": dict(normalization="RMSNorm", qk_layernorm=True),
}


def _model(tp, layout):
    from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, 1, seed=1)
    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, vocab_size=VOCAB, max_sequence_length=24,
        make_vocab_size_divisible_by=8, untie_embeddings_and_output_weights=True,
        **LAYOUTS[layout],
    )  # fmt: skip
    (model,) = build_model(cfg)
    init_weights_layout_invariant([model], 3, std=0.3)
    with torch.no_grad():  # gains away from 1, so a dropped or misplaced gain shows
        gen = torch.Generator().manual_seed(11)
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
        if layout == "rms_qk_unfused":
            for layer in model.decoder.layers:
                layer.self_attention.k_layernorm.eps = 1e-3
    return model.eval()


def _reference(model, tokens):
    """megatron's forward: vocab-parallel logits [b, s, V_pad / tp]."""
    from megatron_eaopd.rollout.generate import _vocab_parallel_output

    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with _vocab_parallel_output(model):
        return model(tokens, pos, None, runtime_gather_output=True)


def _worker(rank, world, layout):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.rollout.fast_decode import FastDecoder

    model = _model(world, layout)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, VOCAB, (3, 12), generator=gen)
    with torch.no_grad():
        ref = _reference(model, tokens)  # [3, 12, V_pad / tp]
        fast = FastDecoder(model, 3, 12, ps.get_tensor_model_parallel_group())
        paths = {
            "folded": len(fast.folded),
            "qk_fused": sum(x is not None for x in fast.qk_norm),
        }
        got = [fast.forward(tokens[:, :5], 0)]  # prefill of positions [0, 5)
        for t in range(5, 12):  # single-position decode
            got.append(fast.forward(tokens[:, t : t + 1], t))
        err = max(float((g - ref[:, i + 4]).abs().max()) for i, g in enumerate(got))
        # per-row paths: rows prefilled to different lengths, then decoded at their own positions
        rows = FastDecoder(model, 3, 12, ps.get_tensor_model_parallel_group())
        lens = torch.tensor([3, 6, 4])
        first = rows.prefill_rows(tokens[:, :6], lens, torch.arange(3))
        err_rows = float((first - ref[torch.arange(3), lens - 1]).abs().max())
        pos = lens.clone()
        for _ in range(4):
            logits = rows.decode_rows(tokens[torch.arange(3), pos], pos)
            err_rows = max(err_rows, float((logits - ref[torch.arange(3), pos]).abs().max()))
            pos = pos + 1
    return dict(err=err, err_rows=err_rows, scale=float(ref.abs().max()), **paths)


@pytest.mark.parametrize("tp", [1, 2])
def test_fast_decoder_equals_megatron_forward(tp):
    for layout in LAYOUTS:
        for res in run_distributed(_worker, tp, layout, timeout=300):
            assert res["scale"] > 1.0, (layout, res)  # the logits are not trivially small
            assert res["err"] < 2e-5 * res["scale"], (layout, res)
            assert res["err_rows"] < 2e-5 * res["scale"], (layout, res)
            # the path under test is the one this layout should take
            folded = 2 * 2 + 1  # 2 norms per layer and the final norm (CPU copies)
            assert res["folded"] == (folded if layout.startswith("rms") else 0), (layout, res)
            fused = 2 if layout == "rms_qk" else 0
            assert res["qk_fused"] == fused, (layout, res)
