"""FastDecoder's forward equals megatron-core's forward of the same weights, for every norm layout
it handles differently: RMSNorm gains folded into the CPU weight copies and the QK RMSNorms fused
with RoPE (the Qwen3 layout), RMSNorm without QK norms (RoPE of queries and keys in one pass),
LayerNorm everywhere (the norm modules run as they are), and QK norms it cannot fuse (RMSNorm
QK norms with another eps than each other), one query head per group with biases on every
linear, and bf16 parameters (the modules). TP 1 and TP 2, with the prefill, single-position
decode, per-row decode and per-row prefill paths. Norm gains, biases and eps are set so that a
dropped one shows; on the fused layouts the norm modules are made to raise."""

from __future__ import annotations

import pytest
import torch

from megatron_eaopd.parallel.groups import any_rank
from tests.dist import run_distributed

VOCAB = 40

LAYOUTS = {
    "rms_qk": dict(normalization="RMSNorm", qk_layernorm=True),
    # one query head per group (r = 1) and biases on every linear, QKV included
    "rms_qk_r1_bias": dict(
        normalization="RMSNorm",
        qk_layernorm=True,
        num_query_groups=4,
        add_bias_linear=True,
        add_qkv_bias=True,
    ),  # fmt: skip
    "rms": dict(normalization="RMSNorm", qk_layernorm=False),
    "layernorm_qk": dict(normalization="LayerNorm", qk_layernorm=True),
    "rms_qk_unfused": dict(normalization="RMSNorm", qk_layernorm=True),
    # bf16 parameters: the norm modules (a folded gain would round twice)
    "rms_qk_bf16": dict(normalization="RMSNorm", qk_layernorm=True, params_dtype="bfloat16"),
}
FUSED = ("rms_qk", "rms_qk_r1_bias")  # fold and QK fusion expected


def _model(tp, layout, use_te=False):
    from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, 1, seed=1)
    kw = dict(num_query_groups=2) | LAYOUTS[layout]
    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
        vocab_size=VOCAB, max_sequence_length=24, make_vocab_size_divisible_by=8,
        untie_embeddings_and_output_weights=True, **kw,
    )  # fmt: skip
    (model,) = build_model(cfg, use_te=use_te)
    init_weights_layout_invariant([model], 3, std=0.3)
    with torch.no_grad():  # gains away from 1, so a dropped or misplaced gain shows
        gen = torch.Generator().manual_seed(11)
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn(p.shape, generator=gen).to(p))
        for mod in model.modules():  # an eps that matters, so a dropped or misplaced one shows
            if isinstance(mod, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                mod.eps = 0.05
        if layout == "rms_qk_unfused":
            for layer in model.decoder.layers:
                layer.self_attention.k_layernorm.eps = 0.02
    return model.eval()


def _reference(model, tokens):
    """megatron's forward: vocab-parallel logits [b, s, V_pad / tp]."""
    from megatron_eaopd.rollout.generate import _vocab_parallel_output

    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with _vocab_parallel_output(model):
        return model(tokens, pos, None, runtime_gather_output=True)


def _forbidden(*_args, **_kwargs):
    raise AssertionError("a norm module ran on a fused path")


def _worker(rank, world, layout, use_te=False):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import compute_device
    from megatron_eaopd.rollout.fast_decode import FastDecoder

    model = _model(world, layout, use_te)
    gen = torch.Generator().manual_seed(5)
    dev = compute_device()  # the CPU here; a GPU in tests/rollout/test_cuda.py
    tokens = torch.randint(1, VOCAB, (3, 12), generator=gen).to(dev)
    with torch.no_grad():
        ref = _reference(model, tokens)  # [3, 12, V_pad / tp]
        fast = FastDecoder(model, 3, 12, ps.get_tensor_model_parallel_group())
        paths = {
            "folded": len(fast.folded),
            "qk_fused": sum(x is not None for x in fast.qk_norm),
        }
        if layout in FUSED:  # the fused paths must not call a norm module: none where the
            # gains are folded (the CPU weight copies), else the QK norms (fused on any device)
            for name, mod in model.named_modules():
                qk = name.endswith(("q_layernorm", "k_layernorm"))
                if isinstance(mod, torch.nn.RMSNorm) and (fast.folded or qk):
                    mod.forward = _forbidden
        got = [fast.forward(tokens[:, :5], 0)]  # prefill of positions [0, 5)
        for t in range(5, 12):  # single-position decode
            got.append(fast.forward(tokens[:, t : t + 1], t))
        ref = ref.float()
        err = max(float((g.float() - ref[:, i + 4]).abs().max()) for i, g in enumerate(got))
        # per-row paths: rows prefilled to different lengths, then decoded at their own positions
        rows = FastDecoder(model, 3, 12, ps.get_tensor_model_parallel_group())
        lens, three = torch.tensor([3, 6, 4], device=dev), torch.arange(3, device=dev)
        first = rows.prefill_rows(tokens[:, :6], lens, three)
        err_rows = float((first.float() - ref[three, lens - 1]).abs().max())
        pos = lens.clone()
        for _ in range(4):
            logits = rows.decode_rows(tokens[three, pos], pos)
            diff = (logits.float() - ref[three, pos]).abs().max()
            err_rows = max(err_rows, float(diff))
            pos = pos + 1
    return dict(err=err, err_rows=err_rows, scale=float(ref.abs().max()), **paths)


def check_layout(layout: str, res: dict, cpu: bool = True) -> None:
    """One rank's result of ``_worker``: close to megatron's forward, on the expected paths
    (gains are folded only into the CPU weight copies)."""
    assert res["scale"] > 1.0, (layout, res)  # the logits are not trivially small
    # bf16: the first-step check's own tolerance (continuous.logits_match)
    tol = (5e-2 if layout.endswith("bf16") else 2e-5) * res["scale"]
    assert res["err"] < tol, (layout, res)
    assert res["err_rows"] < tol, (layout, res)
    # the path under test is the one this layout should take
    folded = 2 * 2 + 1  # 2 norms per layer and the final norm (CPU copies)
    fp32_rms = layout.startswith("rms") and not layout.endswith("bf16")
    assert res["folded"] == (folded if fp32_rms and cpu else 0), (layout, res)
    assert res["qk_fused"] == (2 if layout in FUSED else 0), (layout, res)


def layouts_worker(rank, world, use_te=False, layouts=tuple(LAYOUTS)):
    """Every layout in one process group (one start-up, not six)."""
    return {layout: _worker(rank, world, layout, use_te) for layout in layouts}


@pytest.mark.parametrize("tp", [1, 2])
def test_fast_decoder_equals_megatron_forward(tp):
    for results in run_distributed(layouts_worker, tp, timeout=300):
        assert set(results) == set(LAYOUTS)
        for layout, res in results.items():
            check_layout(layout, res)


def _bf16_check_worker(rank, world):
    """bf16 parameters: the first-step check accepts FastDecoder's rounding (where an
    elementwise tolerance rejected it) and still rejects a planted bug (RoPE off), on the
    chunked and the continuous-batching paths."""
    import warnings

    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import compute_device
    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.rollout.continuous import logits_match
    from megatron_eaopd.rollout.fast_decode import FastDecoder

    model = _model(world, "rms_qk_bf16")
    group, dev = ps.get_tensor_model_parallel_group(), compute_device()
    gen = torch.Generator().manual_seed(8)
    elementwise_rejects, accepted = 0, 0
    with torch.no_grad():
        for _ in range(8):
            tokens = torch.randint(1, VOCAB, (4, 10), generator=gen).to(dev)
            ref = _reference(model, tokens)[:, -1]
            got = FastDecoder(model, 4, 10, group).forward(tokens, 0)
            close = torch.allclose(got.float(), ref.float(), atol=5e-2, rtol=5e-2)
            elementwise_rejects += int(any_rank(not close, group, dev))
            accepted += int(logits_match(got, ref, group))
    prompts = [[1] + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in range(2, 10)]
    kw = dict(max_new_tokens=6, eos_id=-1, pad_id=0, vocab_size=VOCAB, params=SamplingParams())
    runs = {}
    original = FastDecoder._rope
    for bug in (False, True):
        if bug:
            FastDecoder._rope = lambda self, x, cos, sin: x
        try:
            for max_batch in (None, 4):  # one chunk; continuous batching (8 prompts, 4 rows)
                stats = {}
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = generate(model, prompts, generator=torch.Generator().manual_seed(2),
                                   stats=stats, max_batch=max_batch, **kw)  # fmt: skip
                warned = any("differ" in str(w.message) for w in caught)
                runs[bug, max_batch] = (stats["fast"], warned, out.tokens)
        finally:
            FastDecoder._rope = original
    # megatron's path in the same chunks (bf16 GEMMs need not give the same bits at another
    # batch size)
    reference = {b: generate(model, prompts, generator=torch.Generator().manual_seed(2),
                             fast_decode=False, max_batch=b, **kw).tokens
                 for b in (None, 4)}  # fmt: skip
    return dict(elementwise_rejects=elementwise_rejects, accepted=accepted, runs=runs,
                reference=reference)  # fmt: skip


@pytest.mark.parametrize("tp", [1, 2])
def test_bf16_first_step_check_accepts_rounding_and_rejects_bugs(tp):
    for res in run_distributed(_bf16_check_worker, tp, timeout=300):
        assert res["elementwise_rejects"] > 0, res  # which an elementwise 5e-2 did not
        check_bf16(res)


def check_bf16(res: dict) -> None:
    """One rank's result of ``_bf16_check_worker``."""
    assert res["accepted"] == 8, res  # every bf16 prefill keeps FastDecoder
    for max_batch in (None, 4):
        fast, warned, _ = res["runs"][False, max_batch]
        assert fast == 1 and not warned, (max_batch, fast, warned)
        fast, warned, tokens = res["runs"][True, max_batch]
        assert fast == 0 and warned, (max_batch, fast, warned)  # RoPE off: megatron's path
        assert torch.equal(tokens, res["reference"][max_batch])  # with megatron's tokens


@pytest.mark.parametrize("batch_dim,pos_dim", [(1, 3), (1, 0)])  # FastDecoder's, megatron's
def test_compact_rows_moves_kept_rows_to_the_front_in_place(batch_dim, pos_dim):
    from megatron_eaopd.rollout.fast_decode import compact_rows

    gen = torch.Generator().manual_seed(0)
    shape = [3, 19, 2, 7, 4] if pos_dim == 3 else [7, 19, 2, 4]
    for keep in ([0, 1, 2], [18], [1, 5, 6, 7, 8, 12, 17, 18], list(range(19)), [3, 9]):
        cache = torch.randn(shape, generator=gen)
        before, ptr = cache.clone(), cache.data_ptr()
        idx = torch.tensor(keep)
        compact_rows(cache, idx, 5, batch_dim=batch_dim, pos_dim=pos_dim)
        assert cache.data_ptr() == ptr and list(cache.shape) == shape  # no new cache
        want = before.index_select(batch_dim, idx).narrow(pos_dim, 0, 5)
        got = cache.narrow(batch_dim, 0, len(keep)).narrow(pos_dim, 0, 5)
        assert torch.equal(got, want), keep
        # positions past `length` are not touched
        rest = cache.narrow(pos_dim, 5, shape[pos_dim] - 5)
        assert torch.equal(rest, before.narrow(pos_dim, 5, shape[pos_dim] - 5))


def _nonfinite_worker(rank, world):
    """logits_match at TP 2 with a NaN or inf in one rank's shard only: a mismatch on every rank
    (a MAX all-reduce can drop a NaN, so the verdict must not rest on the values alone)."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import initialize_parallel
    from megatron_eaopd.rollout.continuous import logits_match

    initialize_parallel(world, 1, seed=1)
    group = ps.get_tensor_model_parallel_group()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        ref = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank)).to(dtype)
        out[dtype, "same"] = logits_match(ref.clone(), ref, group)
        for bad_rank in range(world):
            for value in (float("nan"), float("inf")):
                got = ref.clone()
                if rank == bad_rank:
                    got[1, 3] = value
                out[dtype, bad_rank, value] = logits_match(got, ref, group)
    return out


def test_logits_match_rejects_nan_or_inf_on_any_rank():
    results = run_distributed(_nonfinite_worker, 2)
    for res in results:
        for key, verdict in res.items():
            assert verdict == ("same" in key), (key, verdict)


def test_compact_rows_refuses_unordered_rows():
    from megatron_eaopd.rollout.fast_decode import compact_rows

    for idx in ([2, 0], [1, 1]):
        with pytest.raises(ValueError, match="ascending, distinct"):
            compact_rows(torch.zeros(4, 3, 2), torch.tensor(idx), 2, batch_dim=0, pos_dim=1)


class TELayerNormColumnParallelLinear(torch.nn.Module):
    """Stands in for Transformer Engine's fused norm + column-parallel linear (TE does not run on
    a CPU): the weight, an empty bias tensor when there is none (TE's convention), and the norm
    attributes megatron-core's own TE code reads (normalization, eps, zero_centered_gamma,
    layer_norm_weight, layer_norm_bias). Its forward must never run."""

    def __init__(self, linear, norm, zero_centered: bool):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias if linear.bias is not None else torch.empty(0)
        self.normalization = "RMSNorm" if isinstance(norm, torch.nn.RMSNorm) else "LayerNorm"
        self.eps = norm.eps
        self.zero_centered_gamma = zero_centered
        gain = norm.weight.detach() - 1.0 if zero_centered else norm.weight.detach()
        self.layer_norm_weight = torch.nn.Parameter(gain)
        self.layer_norm_bias = getattr(norm, "bias", None)

    forward = _forbidden


class TERowParallelLinear(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias if linear.bias is not None else torch.empty(0)

    forward = _forbidden


def _te_shaped(model, zero_centered: bool):
    """Swap the local spec's norms and linears for TE-shaped ones holding the same weights."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer in model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        attn.linear_qkv = TELayerNormColumnParallelLinear(attn.linear_qkv, layer.input_layernorm,
                                                          zero_centered)  # fmt: skip
        mlp.linear_fc1 = TELayerNormColumnParallelLinear(mlp.linear_fc1, layer.pre_mlp_layernorm,
                                                         zero_centered)  # fmt: skip
        layer.input_layernorm, layer.pre_mlp_layernorm = IdentityOp(), IdentityOp()
        attn.linear_proj = TERowParallelLinear(attn.linear_proj)
        mlp.linear_fc2 = TERowParallelLinear(mlp.linear_fc2)


def _te_worker(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_eaopd.rollout.fast_decode import FastDecoder

    out = {}
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, VOCAB, (3, 12), generator=gen)
    for layout in ("rms_qk", "rms_qk_r1_bias", "layernorm_qk"):
        for zero_centered in (False, True):
            model = _model(world, layout)
            with torch.no_grad():
                ref = _reference(model, tokens).float()  # the local spec's own forward
                _te_shaped(model, zero_centered)
                reason = FastDecoder.unsupported(model)
                fast = FastDecoder(model, 3, 12, ps.get_tensor_model_parallel_group())
                got = [fast.forward(tokens[:, :5], 0)]
                got += [fast.forward(tokens[:, t : t + 1], t) for t in range(5, 12)]
                err = max(float((g.float() - ref[:, i + 4]).abs().max()) for i, g in enumerate(got))
            out[layout, zero_centered] = dict(reason=reason, err=err, scale=float(ref.abs().max()))
    # what it must refuse: a TE layer it does not know, an IdentityOp with no norm behind it, fp8
    model = _model(world, "rms_qk")
    _te_shaped(model, False)
    unknown = type("TELayerNormMLP", (torch.nn.Module,), {})
    model.decoder.layers[0].mlp.linear_fc2.__class__ = unknown
    out["unknown"] = FastDecoder.unsupported(model)
    model = _model(world, "rms_qk")
    model.decoder.layers[0].input_layernorm = IdentityOp()
    out["no norm"] = FastDecoder.unsupported(model)
    model = _model(world, "rms_qk")  # a TE linear's fused norm after a norm module: two norms
    mlp = model.decoder.layers[1].mlp
    mlp.linear_fc1 = TELayerNormColumnParallelLinear(mlp.linear_fc1, torch.nn.RMSNorm(32), False)
    out["two norms"] = FastDecoder.unsupported(model)
    model = _model(world, "rms_qk")  # a linear class of neither spec (e.g. inference-only)
    attn = model.decoder.layers[0].self_attention
    attn.linear_qkv.__class__ = type("InferenceLayerNormColumnParallelLinear",
                                     (type(attn.linear_qkv),), {})  # fmt: skip
    out["other linear"] = FastDecoder.unsupported(model)
    for name, value in (("fp8", "hybrid"), ("quant_recipe", object()), ("window_size", (8, 0))):
        model = _model(world, "rms_qk")
        setattr(model.config, name, value)
        out[name] = FastDecoder.unsupported(model)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_fast_decoder_reads_transformer_engine_layers(tp):
    """Megatron's TE spec (the default where TE is installed): the norm fused into
    linear_qkv / linear_fc1, empty bias tensors. FastDecoder on TE-shaped layers == the local
    spec's forward of the same weights, zero-centred gains included; unknown layers refused."""
    for res in run_distributed(_te_worker, tp, timeout=300):
        for key, r in res.items():
            if isinstance(key, tuple):
                assert r["reason"] is None, (key, r)
                assert r["err"] < 2e-5 * r["scale"], (key, r)
        assert res["unknown"] == "layer linear_fc2 is TELayerNormMLP", res["unknown"]
        assert res["no norm"] == (
            "layer input_layernorm is IdentityOp before a ColumnParallelLinear"
        ), res["no norm"]
        assert res["two norms"] == (
            "layer pre_mlp_layernorm is RMSNorm before a TELayerNormColumnParallelLinear"
        ), res["two norms"]
        assert res["other linear"] == (
            "layer linear_qkv is InferenceLayerNormColumnParallelLinear"
        ), res["other linear"]
        assert res["fp8"] == "config.fp8='hybrid'", res["fp8"]
        assert res["quant_recipe"].startswith("config.quant_recipe="), res["quant_recipe"]
        assert res["window_size"] == "config.window_size=(8, 0)", res["window_size"]
