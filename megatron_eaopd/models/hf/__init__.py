"""Hugging Face interop: config.json -> ModelConfig, HF weights in and out at any TP x PP layout.

    cfg = model_config_from_hf(hf_dir)            # reads config.json; refuses what it cannot map
    chunks = build_model(cfg)                      # under the current megatron layout
    load_hf_weights(chunks, hf_dir)                # each rank reads only its own blocks
    ...
    save_hf_weights(chunks, out_dir, dtype="bf16", tokenizer_dir=hf_dir)   # every rank calls it

Supported: Qwen3 (Qwen3ForCausalLM), Qwen2 / Qwen2.5 (Qwen2ForCausalLM), Llama 2 / 3 / 3.1+
(LlamaForCausalLM, with "llama3" RoPE scaling). transformers is not needed (only safetensors).
"""

from megatron_eaopd.models.hf.config import (
    ARCHITECTURES,
    MissingHFFile,
    hf_config_dict,
    model_config_from_hf,
    read_hf_config,
)
from megatron_eaopd.models.hf.layout import expected_hf_shapes
from megatron_eaopd.models.hf.load import check_hf_folder, load_hf_weights
from megatron_eaopd.models.hf.reader import HFWeights
from megatron_eaopd.models.hf.save import save_hf_weights

__all__ = [
    "ARCHITECTURES",
    "HFWeights",
    "MissingHFFile",
    "check_hf_folder",
    "expected_hf_shapes",
    "hf_config_dict",
    "load_hf_weights",
    "model_config_from_hf",
    "read_hf_config",
    "save_hf_weights",
]
