"""Where each Hugging Face tensor lives in megatron's parameters at a given TP rank (no I/O).

A megatron parameter on one TP rank is made of `Piece`s: rectangular blocks of HF tensors.
`P[piece.local_index] == HF[piece.hf_key][piece.hf_index]`. Loading copies HF blocks into the
parameter; exporting sends the blocks to rank 0. The rules (h hidden, n query heads, g query
groups, d head dim, f ffn width, V the HF vocabulary, V_pad megatron's padded one, r/t the TP
rank/size):

| megatron parameter (local shape)                 | HF tensors                                  |
|--------------------------------------------------|---------------------------------------------|
| embedding.word_embeddings.weight [V_pad/t, h]    | model.embed_tokens.weight rows r*V_pad/t.., |
| output_layer.weight [V_pad/t, h]                 | lm_head.weight (embed_tokens when tied),    |
|                                                  | rows >= V stay zero                         |
| linear_qkv.weight [(g/t)(n/g + 2)d, h]           | per local group: its n/g q heads, then its  |
| linear_qkv.bias [(g/t)(n/g + 2)d]                | k head, then its v head (q/k/v_proj)        |
| linear_proj.weight [h, n d / t]                  | o_proj.weight columns                       |
| linear_fc1.weight [2f/t, h]                      | [gate_proj rows; up_proj rows] of shard r   |
| linear_fc2.weight [h, f/t]                       | down_proj.weight columns                    |
| norms [h] or [d]                                 | the same tensor, whole, on every rank       |

Layer-norm names: megatron's local spec has input_layernorm / pre_mlp_layernorm, the Transformer
Engine spec fuses them into linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight; both map
to HF input_layernorm / post_attention_layernorm. Layer numbers are global (TransformerLayer's
1-based layer_number already includes the PP / VPP offset).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_eaopd.models.config import ModelConfig

__all__ = ["Piece", "expected_hf_shapes", "param_pieces"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYER_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
EMBED, LM_HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


@dataclass(frozen=True)
class Piece:
    """A block of an HF tensor inside a megatron parameter (slices are plain (start, stop))."""

    hf_key: str
    hf_index: tuple[tuple[int, int], ...]
    local_index: tuple[tuple[int, int], ...]

    def hf_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.hf_index)

    def local_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.local_index)

    @property
    def numel(self) -> int:
        n = 1
        for a, b in self.hf_index:
            n *= b - a
        return n


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{HF key: global shape} of every tensor the HF model of `cfg` has, in file order."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.add_qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if cfg.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes[FINAL_NORM] = (h,)
    if not cfg.tied_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, h)
    return shapes


def _full(shape) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in shape)


def _qkv(prefix, kind, local_shape, cfg, tp_rank, tp) -> list[Piece]:
    d, per_group = cfg.head_dim, cfg.num_attention_heads // cfg.query_groups
    local_groups = cfg.query_groups // tp
    rest = tuple((0, n) for n in local_shape[1:])
    pieces = []
    for j in range(local_groups):
        g = tp_rank * local_groups + j
        base = j * (per_group + 2) * d
        blocks = (
            ("q_proj", g * per_group * d, per_group * d, base),
            ("k_proj", g * d, d, base + per_group * d),
            ("v_proj", g * d, d, base + (per_group + 1) * d),
        )
        for proj, start, rows, local_start in blocks:
            pieces.append(
                Piece(
                    f"{prefix}self_attn.{proj}.{kind}",
                    ((start, start + rows),) + rest,
                    ((local_start, local_start + rows),) + rest,
                )
            )
    return pieces


def _vocab_rows(key, local_shape, cfg, tp_rank) -> list[Piece]:
    rows, h = local_shape
    start = tp_rank * rows
    stop = min(start + rows, cfg.vocab_size)
    if stop <= start:
        return []  # this shard holds padding only
    return [Piece(key, ((start, stop), (0, h)), ((0, stop - start), (0, h)))]


def _expected_local_shape(suffix, cfg, tp) -> tuple[int, ...] | None:
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv_rows = cfg.query_groups // tp * (cfg.num_attention_heads // cfg.query_groups + 2) * d
    return {
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d // tp),
        "mlp.linear_fc1.weight": (2 * f // tp, h),
        "mlp.linear_fc2.weight": (h, f // tp),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
    }.get(suffix, (h,) if suffix in _LAYER_NORMS else None)


def param_pieces(
    name: str,
    local_shape: tuple[int, ...],
    cfg: ModelConfig,
    tp_rank: int,
    tp: int,
    layer_index: dict[int, int],
) -> tuple[list[Piece], bool]:
    """The HF blocks of megatron parameter `name` on TP rank `tp_rank` of `tp`.

    Args:
        name: the parameter's name in its GPTModel chunk ('decoder.layers.0.mlp.linear_fc1.weight').
        local_shape: its shape on this rank.
        cfg: the model's shape (vocab_size: the HF vocabulary).
        layer_index: chunk-local layer index -> global 0-based layer (layer offset under PP/VPP).
    Returns:
        (pieces, zero_rest): zero_rest is True for the vocabulary-padded embedding and output
        layer, whose rows outside the pieces must be zero.
    Raises:
        ValueError: a parameter with no HF counterpart, or a local shape the layout does not give.
    """
    local_shape = tuple(local_shape)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        # any padding megatron chose, as long as the shards cover the HF vocabulary
        rows = max(local_shape[0], -(-cfg.vocab_size // tp))
        _check_shape(name, local_shape, (rows, cfg.hidden_size))
    if name == "embedding.word_embeddings.weight":
        return _vocab_rows(EMBED, local_shape, cfg, tp_rank), True
    if name == "output_layer.weight":
        key = EMBED if cfg.tied_embeddings else LM_HEAD
        return _vocab_rows(key, local_shape, cfg, tp_rank), True
    if name == "decoder.final_layernorm.weight":
        _check_shape(name, local_shape, (cfg.hidden_size,))
        return [Piece(FINAL_NORM, _full(local_shape), _full(local_shape))], False
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"megatron parameter {name!r} has no Hugging Face counterpart")
    local_layer, suffix = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer_index[local_layer]}."
    expected = _expected_local_shape(suffix, cfg, tp)
    if expected is None:
        raise ValueError(
            f"megatron parameter {name!r} has no Hugging Face counterpart (a bias or norm the "
            f"HF architecture does not have)"
        )
    _check_shape(name, local_shape, expected)
    if suffix in _LAYER_NORMS:
        key = prefix + _LAYER_NORMS[suffix]
        return [Piece(key, _full(local_shape), _full(local_shape))], False
    if suffix == "self_attention.linear_qkv.weight":
        return _qkv(prefix, "weight", local_shape, cfg, tp_rank, tp), False
    if suffix == "self_attention.linear_qkv.bias":
        return _qkv(prefix, "bias", local_shape, cfg, tp_rank, tp), False
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        cols = local_shape[1]
        key = prefix + (
            "self_attn.o_proj.weight" if suffix.startswith("self") else "mlp.down_proj.weight"
        )
        hf_index = ((0, local_shape[0]), (tp_rank * cols, (tp_rank + 1) * cols))
        return [Piece(key, hf_index, _full(local_shape))], False
    # mlp.linear_fc1.weight: [gate shard; up shard]
    rows, h = local_shape[0] // 2, local_shape[1]
    hf_rows = (tp_rank * rows, (tp_rank + 1) * rows)
    return [
        Piece(prefix + "mlp.gate_proj.weight", (hf_rows, (0, h)), ((0, rows), (0, h))),
        Piece(prefix + "mlp.up_proj.weight", (hf_rows, (0, h)), ((rows, 2 * rows), (0, h))),
    ], False


def _check_shape(name, local_shape, expected) -> None:
    if tuple(local_shape) != tuple(expected):
        raise ValueError(
            f"megatron parameter {name!r} has shape {tuple(local_shape)} but the Hugging Face "
            f"model expects {tuple(expected)} at this TP size: build the model from the same "
            f"config (model_config_from_hf) before loading"
        )


def chunk_layer_index(chunk) -> dict[int, int]:
    """{chunk-local layer index: global 0-based layer} from the layers' layer_number."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None) or []
    return {i: int(layer.layer_number) - 1 for i, layer in enumerate(layers)}
