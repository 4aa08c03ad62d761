"""Student and teacher megatron-core GPTModels: shapes, builders, the frozen teacher, checkpoints.

megatron-core is imported lazily inside the functions, so importing this package is cheap.
"""

from megatron_eaopd.models.builder import build_model, init_weights_layout_invariant, layer_spec
from megatron_eaopd.models.config import PRESETS, ModelConfig, get_preset

__all__ = [
    "PRESETS",
    "ModelConfig",
    "build_model",
    "get_preset",
    "init_weights_layout_invariant",
    "layer_spec",
]
