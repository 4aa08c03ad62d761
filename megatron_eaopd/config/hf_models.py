"""Models given as Hugging Face folders (``model.student_hf`` / ``model.teacher_hf``).

When a model comes from an HF folder its shape is that folder's config.json, and when it comes
from a project checkpoint that records its model config (``eaopd-convert import-hf`` outputs,
trainer saves), that config: the config's shape keys are filled from it (so the resolved
config.yaml shows the real model), and a shape key the user wrote that disagrees is an error
naming both values. Unsupported architectures, a missing
config.json, a folder set together with a project checkpoint, and teacher and student tokenizers
that differ are refused here, when the config is loaded: before any process group exists.
"""

from __future__ import annotations

import json
import os

__all__ = [
    "context_warning",
    "SHAPE_KEYS",
    "TOKENIZER_FOLDER_FILES",
    "has_tokenizer_files",
    "hf_sources",
    "imported_from",
    "recorded_model_config",
    "recorded_tokenizer",
    "resolve_hf_models",
    "schema_shape",
    "tokenizer_fingerprint",
    "tokenizer_warning",
]

#: Shape keys of a config model section that an HF config.json determines.
SHAPE_KEYS = (
    "layers", "hidden", "heads", "query_groups", "ffn_hidden", "vocab_size", "kv_channels",
    "rope_base", "norm", "tied_embeddings", "qk_layernorm", "norm_eps",
)  # fmt: skip


#: Files of which a Hugging Face tokenizer folder holds at least one (what AutoTokenizer builds
#: a tokenizer from); a model folder saved without its tokenizer holds none.
TOKENIZER_FOLDER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
)  # fmt: skip


def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` holds any of ``TOKENIZER_FOLDER_FILES``."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FOLDER_FILES)


def _tokenizer_folder_problem(cfg, problems: list) -> bool:
    """A Hugging Face ``tokenizer.path`` folder without tokenizer files (a model saved without
    its tokenizer, which ``tokenizer.kind: auto`` takes from ``model.teacher_hf``):
    transformers then loads an empty tokenizer and the run fails later with a misleading
    message. Appends the problem naming the folder and the fix; True when it did."""
    path = cfg.tokenizer.path
    if cfg.tokenizer.kind != "huggingface" or not path or not os.path.isdir(path):
        return False
    if has_tokenizer_files(path):
        return False
    hf = {w: getattr(cfg.model, f"{w}_hf") for w in ("teacher", "student")}
    same = os.path.abspath(path)
    who = next((w for w, f in hf.items() if f and os.path.abspath(f) == same), None)
    why = f" (the model folder model.{who}_hf, which tokenizer.kind auto takes)" if who else ""
    other = next(((w, f) for w, f in hf.items() if f and has_tokenizer_files(f)), None)
    alt = f", e.g. tokenizer.path={other[1]} (model.{other[0]}_hf's)" if other else ""
    problems.append(
        (
            "tokenizer.path",
            f"{path}{why} holds no tokenizer files (none of {', '.join(TOKENIZER_FOLDER_FILES)}):"
            " transformers would load an empty tokenizer. Copy the tokenizer files of the model "
            "it was trained from into the folder, or set tokenizer.path to a folder that has "
            f"them{alt}",
        )
    )
    return True


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
    settings), else in a slow tokenizer's vocab.json, read without transformers; None when the
    folder has neither. ``eaopd-convert import-hf`` records it with the checkpoint."""
    from megatron_eaopd.models.vocab_check import tokenizer_fingerprint as fingerprint

    table = _token_table(folder)
    return None if table is None else fingerprint(table).digest


def _token_table(folder: str) -> dict | None:
    """token -> id of ``folder/tokenizer.json`` (vocabulary and added tokens), else of a slow
    BPE tokenizer's ``vocab.json`` with ``tokenizer_config.json``'s added tokens; None when the
    folder has neither (a sentencepiece ``tokenizer.model`` alone is not read)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return _slow_token_table(folder)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    table = dict(vocab)
    table.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return table


def _slow_token_table(folder: str) -> dict | None:
    """token -> id of a slow BPE tokenizer folder (vocab.json + merges.txt, GPT-2 / Qwen2 style):
    vocab.json plus the added tokens of added_tokens.json and tokenizer_config.json's
    ``added_tokens_decoder``; None without vocab.json."""
    path = os.path.join(folder, "vocab.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        table = dict(json.load(f))
    try:  # transformers before 4.34 kept added tokens in added_tokens.json (token -> id)
        with open(os.path.join(folder, "added_tokens.json"), encoding="utf-8") as f:
            table.update({str(t): int(i) for t, i in json.load(f).items()})
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            added = json.load(f).get("added_tokens_decoder") or {}
    except (OSError, ValueError):
        added = {}
    table.update({t["content"]: int(i) for i, t in added.items() if isinstance(t, dict)})
    return table


def _recorded(root: str | None) -> tuple:
    """(ModelConfig or None, source or None) recorded with the checkpoint root ``root``."""
    if not root or not os.path.isdir(root):
        return None, None
    from megatron_eaopd.models.checkpoint import read_model_config

    try:
        return read_model_config(root)
    except (OSError, ValueError, TypeError):
        return None, None


def recorded_tokenizer(root: str | None) -> str | None:
    """The tokenizer fingerprint ``eaopd-convert import-hf`` recorded with the checkpoint root
    ``root`` (of its source folder's tokenizer), else None."""
    if not root or not os.path.isdir(root):
        return None
    from megatron_eaopd.models.checkpoint import read_meta, resolve_checkpoint

    try:
        path = root if os.path.isfile(os.path.join(root, "eaopd_meta.json")) else (
            resolve_checkpoint(root))  # fmt: skip
        return read_meta(path).get("extra", {}).get("hf", {}).get("tokenizer_fingerprint")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def recorded_model_config(root: str | None):
    """The ``models.ModelConfig`` recorded with the project checkpoint ``root`` (an
    ``eaopd-convert import-hf`` output or a trainer save), or None: no root, no complete save (the
    trainer's checks name that), or a save of a version that recorded none."""
    return _recorded(root)[0]


def imported_from(root: str | None) -> str | None:
    """The Hugging Face folder a project checkpoint was imported from (``eaopd-convert
    import-hf`` records it as source ``hf:<folder>``), else None."""
    source = _recorded(root)[1]
    if isinstance(source, str) and source.startswith("hf:"):
        return os.path.abspath(source[3:])  # trainer saves may record the path as given
    return None


def hf_sources(cfg) -> dict[str, tuple[str, str]]:
    """``{who: (folder, label)}`` for each model that comes from Hugging Face: its
    ``model.<who>_hf`` folder, or the folder an imported ``model.<who>_checkpoint`` came from
    (absolute; it may be gone since). The label names the key for messages."""
    out = {}
    for who in ("teacher", "student"):
        folder = getattr(cfg.model, f"{who}_hf")
        if folder:
            out[who] = (folder, f"model.{who}_hf")
            continue
        source = imported_from(getattr(cfg.model, f"{who}_checkpoint"))
        if source is not None:
            out[who] = (source, f"model.{who}_checkpoint, imported from {source}")
    return out


def _fill_shape(cfg, who: str, mc, source: str, given: dict, problems: list) -> None:
    """Set ``cfg.model.<who>``'s shape keys from ``mc``; a key the user gave that disagrees is a
    problem naming both values and ``source``."""
    section = getattr(cfg.model, who)
    for name, value in schema_shape(mc).items():
        # vocab_size 0 means "the tokenizer's size" (resolved configs of earlier versions hold it)
        unset = name == "vocab_size" and getattr(section, name) == 0
        if name in given and not unset and getattr(section, name) != value:
            problems.append(
                (
                    f"model.{who}.{name}",
                    f"{getattr(section, name)!r} disagrees with {source} ({value!r}); remove "
                    "the key: the shape comes from there",
                )
            )
        setattr(section, name, value)


def resolve_hf_models(cfg, data: dict, problems: list) -> None:
    """Fill ``cfg.model.<who>`` from ``cfg.model.<who>_hf``, or from the model config recorded
    with ``cfg.model.<who>_checkpoint``; append (key, problem) pairs."""
    from megatron_eaopd.models.hf import model_config_from_hf

    given_sections = (data.get("model") or {}) if isinstance(data, dict) else {}
    for who in ("student", "teacher"):
        folder = getattr(cfg.model, f"{who}_hf")
        given = given_sections.get(who) or {}
        if not folder:
            root = getattr(cfg.model, f"{who}_checkpoint")
            mc = recorded_model_config(root)
            if mc is not None:
                _fill_shape(cfg, who, mc, f"the model config recorded in {root}", given, problems)
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
        _fill_shape(cfg, who, mc, f"{folder}/config.json", given, problems)


def tokenizer_problems(cfg, problems: list) -> None:
    """With HF model folders the tokenizer must be theirs (their embedding rows index its ids).
    A checkpoint imported with ``eaopd-convert import-hf`` counts as the folder it came from.
    Refused: a teacher and a student whose folders' tokenizer.json files map tokens to other ids,
    ``tokenizer.kind: task`` (a tokenizer trained on the task), and a Hugging Face
    ``tokenizer.path`` that maps a token to another id than a model's folder does (compared
    where both have a tokenizer.json; extra tokens are allowed, the embedding size is checked
    when the models are built), and a Hugging Face ``tokenizer.path`` folder holding no
    tokenizer files (a model folder saved without them). Runs on the resolved config
    (``tokenizer.kind: auto`` is the teacher folder's, else the student folder's, else an
    import's folder's tokenizer)."""
    if _tokenizer_folder_problem(cfg, problems):
        return
    sources = hf_sources(cfg)
    folders = {who: folder for who, (folder, _) in sources.items()}
    keys = {who: label for who, (_, label) in sources.items()}
    if not folders:
        return
    before = len(problems)
    if len(folders) == 2:
        prints = {who: tokenizer_fingerprint(f) or recorded_tokenizer(  # the folder gone
            getattr(cfg.model, f"{who}_checkpoint")) for who, f in folders.items()}  # fmt: skip
        if None not in prints.values() and prints["student"] != prints["teacher"]:
            problems.append(
                (
                    keys["student"].split(",")[0],
                    f"the tokenizers of the student ({keys['student']}) and the teacher "
                    f"({keys['teacher']}) map tokens to different ids: distillation needs one "
                    "shared vocabulary",
                )
            )
    kind, path = cfg.tokenizer.kind, cfg.tokenizer.path
    if kind == "task":
        names = " / ".join(keys.values())
        held = [f for f in folders.values() if os.path.isdir(f) and has_tokenizer_files(f)]
        fix = (f"set tokenizer.kind=auto (a model folder's own tokenizer) or huggingface with "
               f"tokenizer.path={held[0]}" if held else "set tokenizer.kind=huggingface with "
               "tokenizer.path at a copy of that model's tokenizer folder (the folders named "
               "hold none now)")  # fmt: skip
        problems.append(
            (
                "tokenizer.kind",
                f"task (a tokenizer trained on the task) cannot drive the model of {names}, "
                f"whose embeddings index that folder's tokenizer ids: {fix}",
            )
        )
        return
    if kind != "huggingface" or not path or not os.path.isdir(path):
        return
    models = {os.path.abspath(f) for f in folders.values()}
    if len(problems) > before and os.path.abspath(path) in models:
        return  # the path is one model's tokenizer: the mismatch above says it all
    mine = _token_table(path)
    for who, folder in folders.items():
        if os.path.abspath(folder) == os.path.abspath(path):
            continue  # the tokenizer is this model's own
        theirs = _token_table(folder)
        if mine is None or theirs is None:
            continue
        clash = sorted((t for t in mine.keys() & theirs.keys() if mine[t] != theirs[t]),
                       key=lambda t: theirs[t])  # fmt: skip
        if clash:
            t = clash[0]
            problems.append(
                (
                    "tokenizer.path",
                    f"{path} maps {len(clash)} token(s) to other ids than {folder} "
                    f"({keys[who]}), e.g. {t!r}: {mine[t]} vs {theirs[t]}. Use the models' own "
                    "tokenizer (tokenizer.path=null with tokenizer.kind=auto)",
                )
            )


def context_warning(cfg) -> str | None:
    """Sequences longer than a Hugging Face model was trained for (``max_position_embeddings``
    of its config.json, or of the folder an imported checkpoint came from): the rollout and
    evaluation limits (``model.*.max_seq_len``) reach positions whose RoPE angles the model has
    never seen. A warning, not a refusal (RoPE extrapolates; a user may mean it). Reads files
    only."""
    out = []
    sources = hf_sources(cfg)
    for who in ("student", "teacher"):
        folder = sources.get(who, (None,))[0]
        try:
            with open(os.path.join(folder or "", "config.json"), encoding="utf-8") as f:
                trained = int(json.load(f).get("max_position_embeddings") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        length = getattr(cfg.model, who).max_seq_len
        if trained and length > trained:
            out.append(f"the {who}'s sequences reach {length} positions, beyond the "
                       f"{trained} its config.json was trained for ({folder})")  # fmt: skip
    if not out:
        return None
    return (
        "; ".join(out) + ": RoPE extrapolates past that, and quality usually drops. Lower "
        "rollout.max_prompt_tokens + max_response_tokens / eval.max_response_tokens"
    )


def tokenizer_warning(cfg) -> str | None:
    """A warning when the teacher and student come from Hugging Face (folders, or checkpoints
    imported with ``eaopd-convert import-hf``) and one's token table cannot be read: a folder
    saved without its tokenizer (no tokenizer.json or vocab.json), or an import whose source
    folder is gone and that recorded no fingerprint (imports before 2026-12-02). Then that they
    share token ids cannot be checked (with both it is, when the config loads). None otherwise
    (``Trainer.setup`` logs it on rank 0)."""
    m, sources = cfg.model, hf_sources(cfg)
    if len(sources) < 2:
        return None
    missing = []
    for who, (folder, _) in sources.items():
        root = getattr(m, f"{who}_checkpoint")
        if tokenizer_fingerprint(folder) is None and recorded_tokenizer(root) is None:
            missing.append(f"model.{who}_hf={folder}" if getattr(m, f"{who}_hf") else
                           f"model.{who}_checkpoint={root} (imported from {folder})")  # fmt: skip
    if not missing:
        return None
    return (
        f"{' and '.join(missing)}: no tokenizer.json or vocab.json to read, so whether teacher "
        f"and student map tokens to the same ids cannot be checked (vocab_size "
        f"{m.teacher.vocab_size} and {m.student.vocab_size}); distillation compares their "
        "distributions id by id. Copy the tokenizer files of the model it was trained from into "
        "the folder (for an import: import it again from a folder that has them)"
    )
