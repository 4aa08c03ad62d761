"""The Hugging Face config.json of the paper's models, written locally for the shipped qwen3
configs (which name HF folders under checkpoints/hf/). config.json alone gives a model's shape;
no weights are needed to load and check a config. Values are the published architectures."""

from __future__ import annotations

import json
import math
import os
import re
import struct

_COMMON = dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu", vocab_size=151936,
    rope_theta=1000000.0, rms_norm_eps=1e-6, num_key_value_heads=8, head_dim=128,
    attention_bias=False, attention_dropout=0.0, use_sliding_window=False, rope_scaling=None,
    torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645, max_window_layers=28,
)  # fmt: skip

# name: (layers, hidden, heads, ffn, tied, max positions)
SHAPES = {
    "Qwen3-8B": (36, 4096, 32, 12288, False, 40960),
    "Qwen3-0.6B-Base": (28, 1024, 16, 3072, True, 32768),
    "Qwen3-1.7B-Base": (28, 2048, 16, 6144, True, 32768),
    "Qwen3-4B-Base": (36, 2560, 32, 9728, True, 32768),
}


def write_config(root: str, name: str) -> str:
    """Write ``root/name/config.json`` and a ``tokenizer_config.json`` (a model folder without
    tokenizer files is refused as ``tokenizer.kind: auto``'s tokenizer); return the folder."""
    layers, hidden, heads, ffn, tied, positions = SHAPES[name]
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    data = dict(
        _COMMON, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=ffn, tie_word_embeddings=tied, max_position_embeddings=positions,
    )  # fmt: skip
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer"}, f)
    return folder


def hf_overrides(config_path, root: str) -> list[str]:
    """Overrides that point a shipped qwen3 config's HF folders at config-only copies under
    ``root`` (none for other configs)."""
    name = os.path.basename(str(config_path))
    if not name.startswith("qwen3-"):
        return []
    out = [f"model.teacher_hf={write_config(root, 'Qwen3-8B')}"]
    m = re.match(r"qwen3-8b-to-([\d.]+b)-", name)
    if m:
        student = {"0.6b": "Qwen3-0.6B-Base", "1.7b": "Qwen3-1.7B-Base", "4b": "Qwen3-4B-Base"}
        out.append(f"model.student_hf={write_config(root, student[m.group(1)])}")
    return out


def write_weight_headers(folder: str) -> None:
    """A sparse ``folder/model.safetensors`` whose header lists every tensor config.json implies
    at its shape (bf16): the trainer's weight checks read headers only, so the published shapes
    are checked without their bytes (the file takes almost no disk)."""
    from megatron_eaopd.models.hf import expected_hf_shapes, model_config_from_hf

    header, offset = {}, 0
    for key, shape in expected_hf_shapes(model_config_from_hf(folder)).items():
        size = 2 * math.prod(shape)
        span = [offset, offset + size]
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": span}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
