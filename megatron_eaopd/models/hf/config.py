"""Hugging Face config.json <-> `ModelConfig`, refusing what the megatron GPTModel cannot represent.

`model_config_from_hf(hf_dir)` reads config.json (no transformers needed) for the three families
the builder reproduces exactly:

| model_type | architecture      | what it adds                                      |
|------------|-------------------|---------------------------------------------------|
| qwen3      | Qwen3ForCausalLM  | per-head q/k RMSNorm, head_dim (default 128)      |
| qwen2      | Qwen2ForCausalLM  | q/k/v biases (Qwen2 and Qwen2.5)                  |
| llama      | LlamaForCausalLM  | Llama 2/3, and Llama 3.1+ "llama3" RoPE scaling   |

All: RMSNorm, SiLU-gated MLP, grouped-query attention, rotate-half RoPE, tied or untied output.
Anything else (MoE, sliding-window attention, yarn / linear / dynamic / longrope RoPE, partial
rotary, other activations, biases on o_proj or the MLP, quantised weights) raises ValueError naming
the config.json field and its value. Both spellings of RoPE parameters are read: transformers 4
(`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`).

`hf_config_dict(cfg)` is the inverse, written in the transformers 4 spelling, which transformers 5,
vLLM and other readers accept.
"""

from __future__ import annotations

import json
import os

from megatron_eaopd.models.config import ModelConfig

__all__ = [
    "ARCHITECTURES",
    "MissingHFFile",
    "hf_config_dict",
    "model_config_from_hf",
    "read_hf_config",
]


class MissingHFFile(FileNotFoundError, ValueError):
    """A file an HF folder must have is absent (config.json, a shard): both a FileNotFoundError
    and a ValueError, so callers catching either (or ValueError for every bad input) see it."""


# model_type -> architecture, and the per-family defaults of fields config.json may omit
ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
_MODEL_TYPE = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
_DEFAULT_HEAD_DIM = {"qwen3": 128}
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def read_hf_config(hf_dir: str) -> dict:
    """The parsed config.json of an HF model folder.

    Raises MissingHFFile (a FileNotFoundError and a ValueError) when the folder or its
    config.json is missing, ValueError when the file is not a JSON object.
    """
    if not os.path.isdir(hf_dir):
        raise MissingHFFile(f"Hugging Face model folder {hf_dir!r} does not exist")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise MissingHFFile(
            f"{hf_dir!r} has no config.json: pass the folder of a Hugging Face model "
            f"(the one holding config.json and the *.safetensors weights)"
        )
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _refuse(field: str, value, why: str):
    raise ValueError(f"config.json {field}={value!r} is not supported: {why}")


def _model_type(hf: dict) -> str:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{t} ({a})" for t, a in ARCHITECTURES.items())
        _refuse("model_type", model_type, f"supported are {supported}")
    for arch in archs:
        if arch != ARCHITECTURES[model_type]:
            _refuse(
                "architectures",
                archs,
                f"model_type {model_type!r} is converted as {ARCHITECTURES[model_type]} only",
            )
    return model_type


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, ModelConfig rope fields) from either spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per layer type ({"full_attention": {...}, "sliding_attention": {...}})
        if set(params) != {"full_attention"}:
            _refuse("rope_parameters", sorted(params), "RoPE parameters per layer type")
        params = params["full_attention"]
    scaling = hf.get("rope_scaling")
    if params is None:
        params = dict(scaling or {})
        if "rope_theta" in hf:
            params["rope_theta"] = hf["rope_theta"]
        field = "rope_scaling"
    else:
        field = "rope_parameters"
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            # both present and disagreeing: trust neither
            kind = scaling.get("rope_type") or scaling.get("type")
            if kind != (params.get("rope_type") or params.get("type")):
                _refuse("rope_scaling", scaling, f"it disagrees with rope_parameters={params}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        _refuse("partial_rotary_factor", partial, "RoPE on part of the head only")
    if kind == "default":
        return theta, {}
    if kind != "llama3":
        _refuse(
            f"{field}.rope_type",
            kind,
            "only plain RoPE and 'llama3' scaling are implemented (yarn, linear, dynamic, "
            "longrope and others would give a different model)",
        )
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in params]
    if missing:
        raise ValueError(f"config.json {field}: llama3 RoPE scaling without {missing}")
    return theta, {
        "rope_scaling": "llama3",
        "rope_scaling_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        "rope_original_max_position_embeddings": int(params["original_max_position_embeddings"]),
    }


#: config.json fields every supported architecture gives (positive integers).
_REQUIRED = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
)  # fmt: skip


def model_config_from_hf(
    hf_dir: str,
    *,
    params_dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    vocab_pad_for_tp: int = 8,
    max_sequence_length: int | None = None,
) -> ModelConfig:
    """The `ModelConfig` of the HF model in `hf_dir` (reads config.json only).

    Args:
        hf_dir: a Hugging Face model folder (config.json, weights, usually a tokenizer).
        params_dtype: 'float32' / 'bfloat16' / 'float16' / 'float64'; None: config.json's
            torch_dtype (dtype), bfloat16 when absent.
        make_vocab_size_divisible_by, vocab_pad_for_tp: megatron's vocabulary padding (see
            ModelConfig); the default pads for every tp dividing 8 alike, so a checkpoint made
            from the import loads at TP 1, 2, 4 and 8.
        max_sequence_length: defaults to config.json's max_position_embeddings.
    Raises:
        MissingHFFile (FileNotFoundError and ValueError): no folder or no config.json.
        ValueError: a field whose value the GPTModel cannot represent exactly (named).
    """
    hf = read_hf_config(hf_dir)
    model_type = _model_type(hf)
    missing = [k for k in _REQUIRED if not isinstance(hf.get(k), int) or hf[k] < 1]
    if missing:  # was a KeyError traceback (a hand-edited or truncated config.json)
        raise ValueError(
            f"{os.path.join(hf_dir, 'config.json')}: {', '.join(missing)} missing or not a "
            f"positive integer; every {model_type} config.json gives {', '.join(_REQUIRED)}: "
            "restore the file from the model's source"
        )
    for field in _MOE_FIELDS:
        if hf.get(field):
            _refuse(field, hf[field], "mixture-of-experts models are not supported")
    if hf.get("quantization_config"):
        _refuse("quantization_config", hf["quantization_config"], "quantised weights")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        _refuse("hidden_act", act, "only the SiLU-gated MLP (silu) is implemented")
    if hf.get("use_sliding_window"):
        _refuse("use_sliding_window", hf["use_sliding_window"], "sliding-window attention")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        _refuse("layer_types", sorted(set(layer_types)), "only full attention is implemented")
    if model_type != "qwen2" and hf.get("attention_bias"):
        _refuse(
            "attention_bias",
            hf["attention_bias"],
            "a bias on o_proj (megatron adds biases to q/k/v only, or to every linear layer)",
        )
    if hf.get("mlp_bias"):
        _refuse("mlp_bias", hf["mlp_bias"], "biases on the MLP projections")
    theta, rope = _rope(hf)

    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or _DEFAULT_HEAD_DIM.get(model_type) or hidden // heads
    if params_dtype is None:
        raw = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        if raw not in _HF_DTYPES:
            _refuse("torch_dtype", raw, f"choose params_dtype explicitly ({sorted(_HF_DTYPES)})")
        params_dtype = _HF_DTYPES[raw]
    max_pos = max_sequence_length or int(hf.get("max_position_embeddings") or 4096)
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        max_sequence_length=max_pos,
        hf_max_position_embeddings=(
            int(hf["max_position_embeddings"]) if hf.get("max_position_embeddings") else None
        ),
        rotary_base=theta,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        qk_layernorm=model_type == "qwen3",
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=model_type == "qwen2",
        untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", False)),
        params_dtype=params_dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        vocab_pad_for_tp=vocab_pad_for_tp,
        architecture=ARCHITECTURES[model_type],
        **rope,
    )


def _check_exportable(cfg: ModelConfig, model_type: str) -> None:
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append(f"normalization={cfg.normalization!r} (HF models here use RMSNorm)")
    if not cfg.swiglu:
        problems.append("swiglu=False (HF models here use the SiLU-gated MLP)")
    if cfg.add_bias_linear:
        problems.append("add_bias_linear=True (biases on every linear layer)")
    if cfg.qk_layernorm != (model_type == "qwen3"):
        problems.append(f"qk_layernorm={cfg.qk_layernorm} (only Qwen3 normalises q and k)")
    if cfg.add_qkv_bias != (model_type == "qwen2"):
        problems.append(f"add_qkv_bias={cfg.add_qkv_bias} (only Qwen2 has q/k/v biases)")
    if cfg.rope_scaling is not None and model_type != "llama":
        problems.append(f"rope_scaling={cfg.rope_scaling!r} (llama3 scaling is a Llama feature)")
    if problems:
        raise ValueError(
            f"the model cannot be written as {ARCHITECTURES[model_type]}: " + "; ".join(problems)
        )


def default_architecture(cfg: ModelConfig) -> str:
    """cfg.architecture, else the family the shape fits (Qwen3 with qk-norm, Qwen2 with q/k/v
    biases, Llama otherwise)."""
    if cfg.architecture:
        return cfg.architecture
    if cfg.qk_layernorm:
        return "Qwen3ForCausalLM"
    if cfg.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def hf_config_dict(
    cfg: ModelConfig,
    *,
    architecture: str | None = None,
    dtype: str = "bfloat16",
    token_ids: dict | None = None,
) -> dict:
    """config.json contents for `cfg` as `architecture` (default: `default_architecture(cfg)`).

    `token_ids`: bos_token_id / eos_token_id / pad_token_id to record (absent ones are null).
    Raises ValueError naming the fields the architecture cannot express.
    """
    architecture = architecture or default_architecture(cfg)
    if architecture not in _MODEL_TYPE:
        raise ValueError(
            f"architecture {architecture!r} is not supported for export: choose one of "
            f"{sorted(_MODEL_TYPE)}"
        )
    model_type = _MODEL_TYPE[architecture]
    _check_exportable(cfg, model_type)
    out = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max(
            cfg.max_sequence_length, cfg.hf_max_position_embeddings or 0
        ),  # the source's context, not the run's length
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tied_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out[key] = (token_ids or {}).get(key)
    return out
