"""Load Hugging Face weights into megatron GPTModel chunks at the current TP x PP (x VPP) layout."""

from __future__ import annotations

import logging

import torch

from megatron_eaopd.models.config import ModelConfig
from megatron_eaopd.models.hf.config import model_config_from_hf
from megatron_eaopd.models.hf.layout import chunk_layer_index, expected_hf_shapes, param_pieces
from megatron_eaopd.models.hf.reader import HFWeights

logger = logging.getLogger(__name__)

__all__ = ["bare_chunks", "check_hf_folder", "load_hf_weights"]


def bare_chunks(model_chunks) -> list:
    """The GPTModels of a chunk list, one chunk, a FrozenTeacher or a Student (DDP unwrapped)."""
    chunks = getattr(model_chunks, "chunks", model_chunks)
    if not isinstance(chunks, (list, tuple)):
        chunks = [chunks]
    out = []
    for chunk in chunks:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        out.append(chunk)
    return out


def _check_model_matches(chunks, cfg: ModelConfig, tp: int, hf_dir: str) -> None:
    for chunk in chunks:
        built = getattr(chunk, "eaopd_model_config", None)
        if built is None:
            tc = chunk.config
            pairs = {
                "num_layers": (tc.num_layers, cfg.num_layers),
                "hidden_size": (tc.hidden_size, cfg.hidden_size),
                "num_attention_heads": (tc.num_attention_heads, cfg.num_attention_heads),
                "num_query_groups": (tc.num_query_groups, cfg.query_groups),
                "kv_channels": (tc.kv_channels, cfg.head_dim),
                "ffn_hidden_size": (tc.ffn_hidden_size, cfg.ffn_hidden_size),
                "qk_layernorm": (tc.qk_layernorm, cfg.qk_layernorm),
            }
            diffs = [f"{k}: {a!r} != {b!r}" for k, (a, b) in pairs.items() if a != b]
        else:  # the padding is the model's choice: only the real vocabulary must agree
            diffs = built.differences(
                cfg.with_changes(
                    make_vocab_size_divisible_by=built.make_vocab_size_divisible_by,
                    vocab_pad_for_tp=built.vocab_pad_for_tp,
                ),
                tp,
            )
        if diffs:
            raise ValueError(
                f"the model was built with another shape than {hf_dir!r} describes "
                f"(model != config.json): {'; '.join(diffs)}. Build it from "
                f"model_config_from_hf({hf_dir!r})."
            )


_TIED_ROWS = 64  # rows of lm_head.weight compared with the embedding in a tied folder


def _check_no_extra_tensors(hf_dir: str, weights: HFWeights, expected: dict, tied: bool) -> None:
    """ValueError naming a few tensors config.json does not account for (e.g. layer 2 of a
    folder whose config.json says 2 layers: most likely the config.json of another model, and a
    load would silently drop them). Allowed: RoPE ``inv_freq`` buffers (older checkpoints store
    them; they are recomputed) and, in a tied folder, ``lm_head.weight`` (compared with the
    embedding by the caller)."""
    extra = [k for k in weights.keys() if k not in expected and not k.endswith(".inv_freq")
             and not (tied and k == "lm_head.weight")]  # fmt: skip
    if extra:
        raise ValueError(
            f"{hf_dir!r} stores {len(extra)} tensor(s) its config.json does not account for, "
            f"e.g. {extra[:3]}: the config.json is probably of another model (layers, "
            f"biases, ...). Use the config.json the weights were saved with, or remove the "
            f"tensors from the weights if they are not part of the model"
        )


def check_hf_folder(
    hf_dir: str, *, trust_pickle: bool = False, model_config: ModelConfig | None = None
) -> HFWeights:
    """Check what a load of ``hf_dir`` needs, reading config.json and the weight files' headers
    (and, in a tied folder that also stores ``lm_head.weight``, 64 rows of it): every tensor
    config.json implies at its shape (``HFWeights.check``), no tensor it does not imply (RoPE
    ``inv_freq`` buffers aside), and a stored head equal to the embedding when config.json ties
    them. transformers keeps a stored head that differs untied; loading it tied would silently
    be another model, so it is refused. `model_config`: the folder's ``model_config_from_hf``
    when the caller has it (default: read again). Returns the folder's ``HFWeights``. Raises
    ValueError (``MissingHFFile``, ``reader.PickledWeights``) naming the problem. No
    communication."""
    cfg = model_config or model_config_from_hf(hf_dir)
    weights = HFWeights(hf_dir, trust_pickle=trust_pickle)
    expected = expected_hf_shapes(cfg)
    weights.check(expected)
    _check_no_extra_tensors(hf_dir, weights, expected, cfg.tied_embeddings)
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if cfg.tied_embeddings and head in weights.keys():
        rows = weights.shape(embed)[0]
        if weights.shape(head) != weights.shape(embed):
            raise ValueError(
                f"{hf_dir!r}: config.json ties the embeddings, but {head} has shape "
                f"{weights.shape(head)} and {embed} {weights.shape(embed)}"
            )
        picks = sorted({round(i * (rows - 1) / (_TIED_ROWS - 1)) for i in range(_TIED_ROWS)})
        for r in picks:
            if not torch.equal(weights.read(head, (slice(r, r + 1),)),
                               weights.read(embed, (slice(r, r + 1),))):  # fmt: skip
                raise ValueError(
                    f"{hf_dir!r}: config.json has tie_word_embeddings true, but the stored {head} "
                    f"differs from {embed} (row {r}): transformers would load this head untied, "
                    f"and tying it here would be another model. Set tie_word_embeddings to false "
                    f"in config.json to keep the stored head, or delete {head} from the weights "
                    f"to tie it to the embedding"
                )
    return weights


@torch.no_grad()
def load_hf_weights(
    model_chunks,
    hf_dir: str,
    *,
    trust_pickle: bool = False,
    progress: bool = False,
) -> ModelConfig:
    """Copy the HF model in `hf_dir` into this rank's chunks; return its ModelConfig.

    Call it on every rank, inside the layout the chunks were built in, after
    `build_model(model_config_from_hf(hf_dir))` (any dtype: blocks are cast on copy). Each rank
    reads only the tensor blocks its own parameters hold (its TP shard of its pipeline stages'
    layers; `HFWeights.read`), so no process ever holds the whole model. Padded vocabulary rows
    are zeroed; with tied embeddings and PP > 1 the last stage's output-layer copy is filled from
    model.embed_tokens.weight.

    Args:
        model_chunks: the chunks of `build_model` (a list, a FrozenTeacher, DDP-wrapped or bare).
        hf_dir: HF folder with config.json and safetensors weights.
        trust_pickle: allow pytorch_model.bin weights (refused by default: pickle runs code).
        progress: a tqdm bar of parameters on global rank 0.
    Raises:
        ValueError: see `HFWeights` and `model_config_from_hf` (absent files raise MissingHFFile,
        a FileNotFoundError and a ValueError); when the model's shape differs from config.json
        (the differing fields are named).
    Collectives: none (the layout is read from megatron's parallel state).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    cfg = model_config_from_hf(hf_dir)
    tp = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    chunks = bare_chunks(model_chunks)
    _check_model_matches(chunks, cfg, tp, hf_dir)
    weights = check_hf_folder(hf_dir, trust_pickle=trust_pickle)

    work = []
    for chunk in chunks:
        layers = chunk_layer_index(chunk)
        for name, param in chunk.named_parameters():
            pieces, zero_rest = param_pieces(name, param.shape, cfg, tp_rank, tp, layers)
            work.append((param, pieces, zero_rest))
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc=f"import {hf_dir}", unit="param")
    for param, pieces, zero_rest in work:
        if zero_rest:
            param.data.zero_()
        for piece in pieces:
            block = weights.read(piece.hf_key, piece.hf_slices())
            param.data[piece.local_slices()].copy_(block)
            del block
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for chunk in chunks:
        chunk.eaopd_source = f"hf:{hf_dir}"
    logger.info("loaded %s (tp rank %d of %d, %d parameters)", hf_dir, tp_rank, tp, len(work))
    return cfg
