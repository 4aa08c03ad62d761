"""Build megatron-core GPTModels for the student and the teacher under the current TP x PP (x VPP).

`build_model(cfg)` returns the list of model chunks this rank holds (one per virtual pipeline
stage; a single chunk without VPP), each with `pre_process` (embedding) on the first pipeline stage
and `post_process` (final norm, output layer) on the last. Layer specs come from Transformer Engine
when TE imports and CUDA is present, from megatron-core's local modules otherwise (CPU).

`init_weights_layout_invariant(chunks, seed)` overwrites the weights with values that depend only on
(seed, parameter name, global position), so models built at different TP/PP layouts hold the same
network: the basis of the layout-parity tests and of reproducible runs across layouts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import zlib

import torch
import torch.nn.functional as F

from megatron_eaopd.models.config import ModelConfig

logger = logging.getLogger(__name__)


def te_available() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - TE raises various errors without CUDA/cuDNN
        return False
    return True


def layer_spec(cfg: ModelConfig, use_te: bool | None = None):
    """The transformer layer ModuleSpec: TE modules when available (or asked), local otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = te_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization
    )


RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}
"""``training.recompute`` -> megatron TransformerConfig fields (activation recomputation): full
checkpoints every layer on its own (its input kept, its forward run again in backward),
selective megatron's default modules (the core attention)."""


def transformer_config(cfg: ModelConfig, tp: int, pp: int, vpp: int | None = None, **overrides):
    """megatron TransformerConfig for `cfg` at tp x pp (x vpp). `overrides` go to TransformerConfig.

    Sequence parallelism is off unless `sequence_parallel=True` is among the overrides (see
    `models.sequence_parallel`); CPU-incompatible fusions (gradient-accumulation fusion, RoPE
    fusion) are off; with VPP on two pipeline stages batched p2p is off (megatron gives wrong
    results there).
    """
    from megatron.core.transformer import TransformerConfig

    cfg.check_layout(tp, pp, vpp)
    dtype = cfg.torch_dtype
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        qk_layernorm=cfg.qk_layernorm,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=False,  # build_model(sequence_parallel=True) overrides it
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=cfg.swiglu and on_gpu,
        # the fused softmax needs megatron's compiled scaled_masked_softmax_cuda extension
        masked_softmax_fusion=on_gpu
        and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        batch_p2p_comm=not (vpp is not None and pp == 2),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    cfg: ModelConfig,
    *,
    use_te: bool | None = None,
    parallel_output: bool = True,
    sequence_parallel: bool = False,
    **config_overrides,
) -> list:
    """Build this rank's GPTModel chunks for `cfg` under megatron's current parallel state.

    Returns a list with one GPTModel per virtual pipeline stage (one without VPP). Each chunk gets
    pre_process on the first pipeline stage (embedding) and post_process on the last (final norm,
    output layer producing [b, s, V_pad / tp] logits, or the per-token loss [b, s] when labels are
    given). The embedding has cfg.padded_vocab_size(tp) rows in total. No communication at build
    time beyond what megatron does for tied embeddings (none until the first gradient all-reduce).

    `sequence_parallel`: megatron sequence parallelism (needs tp > 1; see
    `models.sequence_parallel`): forwards then need a sequence length that is a multiple of tp,
    and generation runs with it switched off (`sequence_parallel_off`). Without TE the local spec
    gets norms tagged for the sequence-parallel gradient all-reduce.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_eaopd.models.sequence_parallel import local_layer_spec
    from megatron_eaopd.parallel.init import current_layout

    layout = current_layout()  # raises with the fix when the parallel state is not initialised
    tp, pp, vpp = layout.tp, layout.pp, layout.vpp
    if sequence_parallel and tp < 2:
        raise ValueError(f"sequence parallelism needs tensor parallelism (tp={tp}; it must be > 1)")
    config = transformer_config(
        cfg, tp, pp, vpp, **config_overrides, sequence_parallel=sequence_parallel
    )
    if use_te is None:
        use_te = te_available()
    spec = layer_spec(cfg, use_te)
    vocab = cfg.padded_vocab_size(tp)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp is not None else None
        if sequence_parallel and not use_te:  # torch norms refuse it: tagged ones instead
            spec = local_layer_spec(
                cfg.qk_layernorm, cfg.normalization, get_num_layers_to_build(config, stage)
            )
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=cfg.max_sequence_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.tied_embeddings,
            position_embedding_type="rope",
            # megatron annotates rotary_base as int but only uses it in `base ** x`: a float
            # keeps non-integer bases (and matches HF, which computes with the float)
            rotary_base=float(cfg.rotary_base),
            vp_stage=stage,
        )
        if cfg.rope_scaling is not None:
            _apply_rope_scaling(model, cfg)
        # the shape this chunk was built from: checkpoints record it and check it on load
        model.eaopd_model_config = cfg
        model.model_type = getattr(model, "model_type", None) or _encoder_or_decoder()
        if torch.cuda.is_available():  # megatron builds some modules (norms) on the CPU
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def llama3_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1+ RoPE frequencies: [d/2] plain inverse frequencies -> [d/2] scaled ones.

    Components whose wavelength 2 pi / f is shorter than L / high_freq_factor (L the original
    context length) are kept; longer than L / low_freq_factor are divided by `factor`; in between
    f' = (1 - a) f / factor + a f with a = (L / wavelength - low) / (high - low). Computed in the
    dtype of `inv_freq` (fp32) with the operations in the order Hugging Face uses, so the
    frequencies are bit-identical to transformers'.
    """
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > original_max_position_embeddings / low_freq_factor
    short_wave = wavelen < original_max_position_embeddings / high_freq_factor
    divided = torch.where(long_wave, inv_freq / factor, inv_freq)
    alpha = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    blended = (1 - alpha) * divided / factor + alpha * divided
    return torch.where(~short_wave & ~long_wave, blended, divided)


def _apply_rope_scaling(model, cfg: ModelConfig) -> None:
    """Replace the rotary embedding's inverse frequencies by the scaled ones (cfg.rope_scaling).

    megatron's own `rope_scaling` hard-codes Llama 3's low/high factors and original length; the
    HF config's values are used here instead. RotaryEmbedding.forward memoises its output per
    sequence length (lru_cache), so the cache is cleared after the change.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"rope_scaling={cfg.rope_scaling!r} needs a model with RoPE")
    rotary.inv_freq = llama3_inv_freq(
        rotary.inv_freq,
        cfg.rope_scaling_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_position_embeddings,
    )
    type(rotary).forward.cache_clear()


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def count_parameters(chunks) -> int:
    """Parameters held by this rank (tied copies counted once per rank)."""
    seen, total = set(), 0
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _is_norm_weight(key: str) -> bool:
    """Norm scales ('...layer_norm_weight', '...final_layernorm.weight', 'q_layernorm.weight')."""
    return key.endswith(("norm_weight", "norm.weight"))


@torch.no_grad()
def init_weights_layout_invariant(chunks, seed: int, std: float | None = None) -> None:
    """Overwrite every weight with a value fixed by (seed, checkpoint key, global index).

    Walks megatron's sharded state dict (the same keys and global shapes dist_checkpointing uses,
    independent of TP/PP), draws each full global tensor from a generator seeded by the seed and
    the key, and copies this rank's slice into the parameter. Norm scales get 1 + N(0, std),
    everything else (weights, biases, norm shifts) N(0, std). Identical networks at any layout;
    meant for tests and small models, since each rank materialises whole global tensors.
    No communication.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    for chunk in chunks:
        sd = chunk.sharded_state_dict()
        apply_factories(sd)
        for sh in _iter_sharded_tensors(sd):
            if sh.key.endswith("_extra_state") or not torch.is_floating_point(sh.data):
                continue
            if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
                continue
            scale = std if std is not None else chunk.config.init_method_std
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(sh.key.encode()))
            full = torch.randn(sh.global_shape, generator=gen, dtype=torch.float32) * scale
            if _is_norm_weight(sh.key):
                full += 1.0
            local = full[sh.global_slice()]
            sh.data.copy_(local.reshape(sh.data.shape).to(sh.data.dtype))


def _iter_sharded_tensors(tree):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(tree, dict):
        for value in tree.values():
            yield from _iter_sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _iter_sharded_tensors(value)
    elif isinstance(tree, ShardedTensor):
        yield tree
