"""Model shapes for the student and the teacher, and presets.

`ModelConfig` holds the architecture only (what a Hugging Face config.json holds), not the parallel
layout: the same ModelConfig builds the model at any TP x PP (x VPP) that divides it, and
`ModelConfig.check_layout(tp, pp, vpp)` says up front when one does not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from megatron_eaopd.parallel.vocab import padded_vocab_size

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
ROPE_SCALING_TYPES = ("llama3",)
"""RoPE scaling types the builder implements (None: plain RoPE)."""

# Fields that do not change the network a checkpoint holds: compute dtype, build-time options.
# `ModelConfig.differences` skips them (the padded vocabulary is compared instead of its knobs).
_NOT_ARCHITECTURE = frozenset(
    {
        "params_dtype",
        "max_sequence_length",
        "init_method_std",
        "hidden_dropout",
        "attention_dropout",
        "architecture",
        "hf_max_position_embeddings",
        "make_vocab_size_divisible_by",
        "vocab_pad_for_tp",
    }
)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only GPT (Llama / Qwen3 style) architecture."""

    num_layers: int
    """Number of transformer layers. Must be divisible by pp (x vpp)."""

    hidden_size: int
    """Width of the residual stream."""

    num_attention_heads: int
    """Query heads. Must be divisible by tp."""

    ffn_hidden_size: int
    """Width of the MLP; with swiglu this is the width of each of the gate and up projections."""

    vocab_size: int
    """Rows of the embedding as the model defines it (the HF config's vocab_size). It may exceed the
    tokenizer's real vocabulary (HF checkpoints pad it, e.g. Qwen3 151,936); megatron pads it again
    to a multiple of make_vocab_size_divisible_by x tp. Losses mask everything past the tokenizer's
    real vocabulary (see models.vocab_check)."""

    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means num_attention_heads (MHA). Must
    divide num_attention_heads and be divisible by tp."""

    kv_channels: int | None = None
    """Per-head dimension; None means hidden_size / num_attention_heads. Qwen3 uses 128."""

    max_sequence_length: int = 4096
    """Longest sequence (prompt + response) the model is built for."""

    rotary_base: float = 10000.0
    """RoPE base (HF rope_theta), kept as a float (e.g. 500000.0 or 1e6)."""

    rope_scaling: str | None = None
    """RoPE frequency scaling: None (plain RoPE) or 'llama3' (Llama 3.1+; the four fields below
    give its parameters, taken from the HF config's rope_scaling / rope_parameters)."""

    rope_scaling_factor: float = 8.0
    """llama3 scaling: low frequencies are divided by this factor."""

    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_max_position_embeddings / low_freq_factor are
    scaled fully."""

    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_max_position_embeddings / high_freq_factor are
    kept; between the two bounds the frequency is interpolated."""

    rope_original_max_position_embeddings: int = 8192
    """llama3 scaling: the context length of pre-training (the HF field of the same name)."""

    normalization: str = "RMSNorm"
    """'RMSNorm' or 'LayerNorm'."""

    layernorm_epsilon: float = 1e-6
    """Epsilon of every norm."""

    qk_layernorm: bool = False
    """Normalise queries and keys per head before RoPE (Qwen3)."""

    swiglu: bool = True
    """Gated SiLU MLP (Llama / Qwen); False gives a GELU MLP."""

    add_bias_linear: bool = False
    """Biases on the linear layers."""

    add_qkv_bias: bool = False
    """Biases on the QKV projection only (Qwen2)."""

    untie_embeddings_and_output_weights: bool = True
    """False ties the output layer to the input embedding (with PP > 1 megatron keeps a copy on the
    last stage and all-reduces their gradients over the embedding group)."""

    params_dtype: str = "float32"
    """'float32', 'bfloat16' or 'float16': dtype of the weights and activations."""

    make_vocab_size_divisible_by: int = 128
    """Megatron pads vocab_size to a multiple of this x tp."""

    vocab_pad_for_tp: int = 1
    """Also pad as if tp were this (the padding multiple is make_vocab_size_divisible_by x
    lcm(tp, vocab_pad_for_tp)). With 8, the padded vocabulary, and so a checkpoint's embedding
    shape, is the same at every tp dividing 8: HF imports use it so one checkpoint loads at any
    TP. 1 is megatron's rule (padding depends on tp)."""

    hf_max_position_embeddings: int | None = None
    """config.json's max_position_embeddings of the Hugging Face folder the shape comes from: the
    context the weights were made for, written back by the export (the larger of it and
    max_sequence_length, which is only the length a run builds for). None: max_sequence_length."""

    architecture: str | None = None
    """Hugging Face architecture the shape comes from and exports to ('Qwen3ForCausalLM',
    'Qwen2ForCausalLM', 'LlamaForCausalLM'); None for shapes defined here (presets, YAML)."""

    init_method_std: float = 0.02
    """Std of the normal initialisation of weights."""

    hidden_dropout: float = 0.0
    """Dropout on the residual stream."""

    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"ModelConfig.vocab_size must be an int >= 2, got {self.vocab_size!r}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"ModelConfig.normalization must be 'RMSNorm' or 'LayerNorm', "
                f"got {self.normalization!r}"
            )
        if self.params_dtype not in _DTYPES:
            raise ValueError(
                f"ModelConfig.params_dtype must be one of {sorted(_DTYPES)}, "
                f"got {self.params_dtype!r}"
            )
        if self.rope_scaling is not None:
            if self.rope_scaling not in ROPE_SCALING_TYPES:
                raise ValueError(
                    f"ModelConfig.rope_scaling must be None or one of {list(ROPE_SCALING_TYPES)}, "
                    f"got {self.rope_scaling!r}"
                )
            original = self.rope_original_max_position_embeddings
            if not self.rope_scaling_factor > 0 or not original > 0:
                raise ValueError(
                    "llama3 RoPE scaling needs rope_scaling_factor > 0 and "
                    f"rope_original_max_position_embeddings > 0, got {self.rope_scaling_factor} "
                    f"and {original}"
                )
            if not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
                raise ValueError(
                    "llama3 RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor > 0, "
                    f"got {self.rope_high_freq_factor} and {self.rope_low_freq_factor}"
                )
        if not isinstance(self.vocab_pad_for_tp, int) or self.vocab_pad_for_tp < 1:
            raise ValueError(
                "ModelConfig.vocab_pad_for_tp must be a positive int, "
                f"got {self.vocab_pad_for_tp!r}"
            )
        groups = self.query_groups
        if self.num_attention_heads % groups != 0:
            raise ValueError(
                f"num_query_groups={groups} must divide num_attention_heads="
                f"{self.num_attention_heads}: set num_query_groups to a divisor of the head count."
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: set kv_channels (the head dimension) explicitly."
            )

    @property
    def query_groups(self) -> int:
        """Key/value heads (num_query_groups, or num_attention_heads for MHA)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    @property
    def tied_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    @property
    def head_dim(self) -> int:
        """Per-head dimension (kv_channels, or hidden_size / num_attention_heads)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """vocab_size rounded up to a multiple of make_vocab_size_divisible_by x
        lcm(tp, vocab_pad_for_tp) (megatron's rule when vocab_pad_for_tp is 1)."""
        return padded_vocab_size(
            self.vocab_size, math.lcm(tp, self.vocab_pad_for_tp), self.make_vocab_size_divisible_by
        )

    def differences(self, other: ModelConfig, tp: int = 1) -> list[str]:
        """Fields that make `other` a different network: ['hidden_size: 64 != 128', ...].

        Compute dtype, sequence length, dropout, initialisation and the architecture label are
        not compared; the padded vocabulary at `tp` is (instead of the knobs that make it).
        """
        diffs = []
        for name in self.__dataclass_fields__:
            if name in _NOT_ARCHITECTURE or name.startswith("rope_") and name != "rope_scaling":
                continue
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "num_query_groups":
                mine, theirs = self.query_groups, other.query_groups
            elif name == "kv_channels":
                mine, theirs = self.head_dim, other.head_dim
            if mine != theirs:
                diffs.append(f"{name}: {mine!r} != {theirs!r}")
        if self.rope_scaling is not None and self.rope_scaling == other.rope_scaling:
            for name in self.__dataclass_fields__:
                if name.startswith("rope_") and getattr(self, name) != getattr(other, name):
                    diffs.append(f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}")
        mine, theirs = self.padded_vocab_size(tp), other.padded_vocab_size(tp)
        if mine != theirs:
            diffs.append(
                f"padded vocabulary at tp={tp} (make_vocab_size_divisible_by, vocab_pad_for_tp): "
                f"{mine} != {theirs}"
            )
        return diffs

    def check_layout(self, tp: int, pp: int, vpp: int | None = None, name: str = "model") -> None:
        """Raise ValueError, naming the fix, when the shape cannot be split over tp x pp (x vpp)
        (the rules of :func:`layout_problems`)."""
        problems = layout_problems(
            self.num_layers, self.num_attention_heads, self.query_groups, self.ffn_hidden_size,
            tp, pp, vpp,
        )  # fmt: skip
        if problems:
            raise ValueError(
                f"{name} ({self.num_layers} layers, {self.num_attention_heads} heads) cannot be "
                f"split at tp={tp}, pp={pp}, vpp={vpp}: "
                + "; ".join(text for _, text in problems) + "."
            )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**data)

    def with_changes(self, **changes) -> ModelConfig:
        return replace(self, **changes)


def _divisors(n: int, limit: int = 16) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def layout_problems(
    layers: int,
    heads: int,
    query_groups: int,
    ffn_hidden: int,
    tp: int,
    pp: int,
    vpp: int | None = None,
    names: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Why a shape cannot be split over tp x pp (x vpp), as ``(axis, problem)`` pairs (axis
    ``"tp"`` or ``"pp"``); empty when it can. Megatron splits the attention heads, the key/value
    heads and the MLP's inner width over tp, and the layers over pp x vpp. The suggested tp
    values satisfy every tp rule at once (the divisors of gcd(heads, query_groups, ffn_hidden)).

    ``names`` renames the quantities in the messages (keys ``layers``, ``heads``,
    ``query_groups``, ``ffn_hidden``; default: the ModelConfig field names), so that the config
    loader can name its own keys. Arithmetic only: no communication.
    """
    n = {"layers": "num_layers", "heads": "num_attention_heads",
         "query_groups": "num_query_groups", "ffn_hidden": "ffn_hidden_size"}  # fmt: skip
    n.update(names or {})
    common = math.gcd(heads, query_groups, ffn_hidden)
    choose = f"choose tp among {[d for d in range(1, common + 1) if common % d == 0]}"
    problems = []
    for key, value, extra in (
        ("heads", heads, ""),
        ("query_groups", query_groups, " (or more query groups)"),
        ("ffn_hidden", ffn_hidden, ""),
    ):
        if value % tp:
            problems.append(
                ("tp", f"{n[key]}={value} is not divisible by tp={tp}: {choose}{extra}")
            )
    stages = pp * (vpp or 1)
    if layers % stages:
        what = f"pp={pp}" if vpp is None else f"pp x vpp = {pp} x {vpp}"
        problems.append(
            (
                "pp",
                f"{n['layers']}={layers} is not divisible by {what}: choose a pipeline size "
                f"(x vpp) among {_divisors(layers)}",
            )
        )
    return problems


# Tiny pair for CPU tests and demos: same vocabulary, teacher twice as deep and wide.
TINY_TEACHER = ModelConfig(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=256,
    vocab_size=320,
    max_sequence_length=256,
    rotary_base=10000.0,
    make_vocab_size_divisible_by=16,
)
TINY_STUDENT = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=320,
    max_sequence_length=256,
    rotary_base=10000.0,
    make_vocab_size_divisible_by=16,
    untie_embeddings_and_output_weights=False,
)

# Qwen3 shapes (from the published HF configs). The tokenizer has fewer real entries than
# vocab_size (151,936): the loss masks the rest via the shared real vocabulary.
QWEN3_8B = ModelConfig(
    num_layers=36,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=8,
    kv_channels=128,
    ffn_hidden_size=12288,
    vocab_size=151936,
    max_sequence_length=40960,
    rotary_base=1000000.0,
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    qk_layernorm=True,
    untie_embeddings_and_output_weights=True,
    params_dtype="bfloat16",
)
QWEN3_1_7B = ModelConfig(
    num_layers=28,
    hidden_size=2048,
    num_attention_heads=16,
    num_query_groups=8,
    kv_channels=128,
    ffn_hidden_size=6144,
    vocab_size=151936,
    max_sequence_length=40960,
    rotary_base=1000000.0,
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    qk_layernorm=True,
    untie_embeddings_and_output_weights=False,
    params_dtype="bfloat16",
)

QWEN3_0_6B = replace(
    QWEN3_1_7B, hidden_size=1024, ffn_hidden_size=3072
)  # 28 layers, 16 / 8 heads of 128, tied
QWEN3_4B = replace(
    QWEN3_1_7B, num_layers=36, hidden_size=2560, num_attention_heads=32, ffn_hidden_size=9728
)  # 8 query groups of 128, tied

PRESETS: dict[str, ModelConfig] = {
    "tiny-teacher": TINY_TEACHER,
    "tiny-student": TINY_STUDENT,
    "qwen3-8b": QWEN3_8B,
    "qwen3-0.6b": QWEN3_0_6B,
    "qwen3-1.7b": QWEN3_1_7B,
    "qwen3-4b": QWEN3_4B,
}


def get_preset(name: str) -> ModelConfig:
    """A preset by name; ValueError listing the names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None
