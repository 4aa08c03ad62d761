"""The Hugging Face config.json of the paper's models, written locally for the shipped qwen3
configs (which name HF folders under checkpoints/hf/). config.json alone gives a model's shape;
no weights are needed to load and check a config. Values are the published architectures."""

from __future__ import annotations

import json
import os
import re

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
    """Write ``root/name/config.json``; return the folder."""
    layers, hidden, heads, ffn, tied, positions = SHAPES[name]
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    data = dict(
        _COMMON, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=ffn, tie_word_embeddings=tied, max_position_embeddings=positions,
    )  # fmt: skip
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(data, f, indent=2)
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
