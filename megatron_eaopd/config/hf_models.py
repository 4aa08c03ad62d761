"""Models given as Hugging Face folders (``model.student_hf`` / ``model.teacher_hf``).

When a model comes from an HF folder its shape is that folder's config.json: the config's shape
keys are filled from it (so the resolved config.yaml shows the real model), and a shape key the
user wrote that disagrees is an error naming both values. Unsupported architectures, a missing
config.json, a folder set together with a project checkpoint, and teacher and student tokenizers
that differ are refused here, when the config is loaded: before any process group exists.
"""

from __future__ import annotations

import json
import os

__all__ = ["SHAPE_KEYS", "resolve_hf_models", "schema_shape", "tokenizer_fingerprint"]

#: Shape keys of a config model section that an HF config.json determines.
SHAPE_KEYS = (
    "layers", "hidden", "heads", "query_groups", "ffn_hidden", "vocab_size", "kv_channels",
    "rope_base", "norm", "tied_embeddings", "qk_layernorm", "norm_eps",
)  # fmt: skip


def schema_shape(mc) -> dict:
    """The config section's shape keys of a ``megatron_eaopd.models.ModelConfig``."""
    return {
        "layers": mc.num_layers,
        "hidden": mc.hidden_size,
        "heads": mc.num_attention_heads,
        "query_groups": mc.query_groups,
        "ffn_hidden": mc.ffn_hidden_size,
        "vocab_size": mc.vocab_size,
        "kv_channels": mc.kv_channels,
        "rope_base": float(mc.rotary_base),
        "norm": {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}[mc.normalization],
        "tied_embeddings": mc.tied_embeddings,
        "qk_layernorm": mc.qk_layernorm,
        "norm_eps": float(mc.layernorm_epsilon),
    }


def tokenizer_fingerprint(folder: str) -> str | None:
    """``models.vocab_check``'s fingerprint of the token -> id mapping in
    ``folder/tokenizer.json`` (vocabulary and added tokens; not the chat template or other
    settings), read without transformers; None when the folder has no such file."""
    from megatron_eaopd.models.vocab_check import tokenizer_fingerprint as fingerprint

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    table = dict(vocab)
    table.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return fingerprint(table).digest


def resolve_hf_models(cfg, data: dict, problems: list) -> None:
    """Fill ``cfg.model.<who>`` from ``cfg.model.<who>_hf``; append (key, problem) pairs."""
    from megatron_eaopd.models.hf import model_config_from_hf

    given_sections = (data.get("model") or {}) if isinstance(data, dict) else {}
    folders = {}
    for who in ("student", "teacher"):
        folder = getattr(cfg.model, f"{who}_hf")
        if not folder:
            continue
        key = f"model.{who}_hf"
        if getattr(cfg.model, f"{who}_checkpoint"):
            problems.append((key, f"set either model.{who}_hf or model.{who}_checkpoint, not both"))
            continue
        try:
            mc = model_config_from_hf(folder)
        except (OSError, ValueError) as err:
            problems.append((key, str(err)))
            continue
        folders[who] = folder
        shape = schema_shape(mc)
        section = getattr(cfg.model, who)
        given = given_sections.get(who) or {}
        for name, value in shape.items():
            if name in given and getattr(section, name) != value:
                problems.append(
                    (
                        f"model.{who}.{name}",
                        f"{getattr(section, name)!r} disagrees with {folder}/config.json "
                        f"({value!r}); remove the key: the shape comes from the HF folder",
                    )
                )
            setattr(section, name, value)
    if len(folders) == 2:
        prints = {who: tokenizer_fingerprint(f) for who, f in folders.items()}
        if None not in prints.values() and prints["student"] != prints["teacher"]:
            problems.append(
                (
                    "model.student_hf",
                    f"the tokenizers of {folders['student']} and {folders['teacher']} map "
                    "tokens to different ids: distillation needs one shared vocabulary",
                )
            )
    if folders:
        _tokenizer_problems(cfg, folders, problems)


def _tokenizer_problems(cfg, folders: dict, problems: list) -> None:
    """The tokenizer must be the HF models' (their embedding rows index its ids): a task-trained
    tokenizer is refused, and an HF tokenizer folder other than the models' must map tokens to
    the same ids (compared on tokenizer.json where both have one)."""
    kind, path = cfg.tokenizer.kind, cfg.tokenizer.path
    names = " / ".join(f"model.{who}_hf" for who in folders)
    if kind == "task":
        problems.append(
            (
                "tokenizer.kind",
                f"task (a tokenizer trained on the task) cannot drive the models of {names}, "
                "whose embeddings index their own tokenizer's ids: set tokenizer.kind=auto (the "
                "teacher folder's tokenizer) or huggingface with tokenizer.path",
            )
        )
    elif kind == "huggingface" and path and os.path.isdir(path):
        mine = tokenizer_fingerprint(path)
        for who, folder in folders.items():
            theirs = tokenizer_fingerprint(folder)
            if None not in (mine, theirs) and mine != theirs:
                problems.append(
                    (
                        "tokenizer.path",
                        f"{path} maps tokens to other ids than {folder} (model.{who}_hf): use "
                        "the models' own tokenizer (tokenizer.path=null with tokenizer.kind=auto "
                        "takes the teacher folder's)",
                    )
                )
