"""Translate config sections into the arguments of the model and loss modules' own configs.

The config uses short YAML-friendly names (``layers``, ``hidden``, ``bf16``); the model builder
uses megatron-core's names (``num_layers``, ``hidden_size``, ``bfloat16``). This is the one place
that maps one onto the other.
"""

from __future__ import annotations

from typing import Any

from megatron_eaopd.config.schema import LossConfig, ModelConfig

__all__ = ["model_kwargs", "objective_kwargs"]

_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_NORM = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


def model_kwargs(
    model: ModelConfig, vocab_size: int | None = None, make_vocab_size_divisible_by: int = 128
) -> dict[str, Any]:
    """Keyword arguments for ``megatron_eaopd.models.ModelConfig`` from a config model shape.

    Args:
        model: ``cfg.model.student`` or ``cfg.model.teacher``.
        vocab_size: used when ``model.vocab_size`` is 0 (the tokenizer's size).
        make_vocab_size_divisible_by: ``cfg.parallel.make_vocab_size_divisible_by``.

    Raises:
        ValueError: when neither the model nor the caller gives a vocabulary size, or
            ``max_seq_len`` is still 0 (configs from :func:`load_config` have it resolved).
    """
    vocab = model.vocab_size or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is 0: pass the tokenizer's vocabulary size")
    if model.max_seq_len <= 0:
        raise ValueError("model.max_seq_len is 0: load the config with load_config() first")
    return dict(
        num_layers=model.layers,
        hidden_size=model.hidden,
        num_attention_heads=model.heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden,
        vocab_size=int(vocab),
        kv_channels=model.kv_channels,
        max_sequence_length=model.max_seq_len,
        rotary_base=float(model.rope_base),
        normalization=_NORM[model.norm],
        layernorm_epsilon=float(model.norm_eps),
        qk_layernorm=model.qk_layernorm,
        untie_embeddings_and_output_weights=not model.tied_embeddings,
        params_dtype=_DTYPE[model.dtype],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )


def objective_kwargs(loss: LossConfig) -> dict[str, Any]:
    """Keyword arguments for ``megatron_eaopd.losses.objectives.ObjectiveConfig``.

    ``eopd_exact`` is the loss module's ``eopd`` in the ``exact`` form; the other names map
    one to one. ``loss.form`` must be resolved (configs from :func:`load_config` have it).
    """
    if loss.form is None:
        raise ValueError("loss.form is null: load the config with load_config() first")
    return dict(
        name="eopd" if loss.objective == "eopd_exact" else loss.objective,
        form=loss.form,
        entropy_threshold=float(loss.entropy_threshold),
        gate_strict=bool(loss.gate_strict),
        fkl_coef=float(loss.fkl_coef),
        gate_width=float(loss.soft_gate_width),
        mix_weight=float(loss.mix_weight),
        jsd_beta=float(loss.jsd_beta),
        clip_eps=float(loss.clip),
        top_k=int(loss.top_k),
        tail_bucket=bool(loss.tail_bucket),
        temperature=float(loss.temperature),
        chunk_size=None if loss.chunk_size is None else int(loss.chunk_size),
        fused_output=loss.fused_output,
        fused_chunk_size=None if loss.fused_chunk_size is None else int(loss.fused_chunk_size),
    )
