"""Load, override, validate and save configurations.

A config file is YAML. Its optional ``defaults:`` key lists other config files (paths relative to
the including file); they are loaded recursively and deep-merged in order, then the file's own keys
are merged on top. Command-line overrides ``a.b.c=value`` are merged last; ``value`` is parsed with
YAML's scalar rules (``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``, ``"text"``). The merged
mapping is validated into :class:`~megatron_eaopd.config.schema.EAOPDConfig`; every problem is
reported with its dotted field path, e.g.
``loss.entropy_treshold: unknown key; did you mean 'entropy_threshold'?``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from megatron_eaopd.config.key_names import unknown_key_problem
from megatron_eaopd.config.schema import EAOPDConfig

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build_arg_parser",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "field_docs",
    "flatten",
    "load_config",
    "load_yaml_with_defaults",
    "longest_rollout_row",
    "parse_override",
    "save_resolved",
]


class ConfigError(ValueError):
    """A configuration problem; ``problems`` holds ``(field_path, message)`` pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = [f"invalid configuration{where}:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in self.problems]
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# YAML files, inheritance and overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (plain YAML keeps the last
    value and silently drops the earlier block's settings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys merged on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | None):  # unhashable: YAML's error
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; merge the two blocks",
                    key_node.start_mark,
                )  # fmt: skip
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        """YAML 1.1 integers, refusing the forms that silently change a value: a leading zero
        (``0120`` is octal 80) and base 60 (``1:20`` is 80). Hex (``0x``) and binary (``0b``)
        say what they are."""
        value = super().construct_yaml_int(node)
        digits = str(node.value).replace("_", "").lstrip("+-")
        if ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits[1] not in "xb"):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} would be read as {value} (YAML 1.1: a leading zero "
                "is octal, ':' base 60); write the number without leading zeros, or quote it "
                "for a string", node.start_mark,
            )  # fmt: skip
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mappings as one mapping of dotted keys (``{"loss": {"top_k": 4}}`` ->
    ``{"loss.top_k": 4}``); lists and scalars are leaves."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    """Return ``base`` updated by ``top``; nested mappings merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_with_defaults(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> dict:
    """Load a YAML config file and resolve its ``defaults:`` chain into one plain mapping.

    Args:
        path: the config file.

    Returns:
        The merged mapping (without the ``defaults`` key).

    Raises:
        ConfigError: missing file, YAML syntax error, non-mapping document, a ``defaults`` entry
            that is not a path, or an inheritance cycle.
    """
    p = Path(path).resolve()
    if p in _stack:
        chain = " -> ".join(str(s) for s in (*_stack, p))
        raise ConfigError([("defaults", f"inheritance cycle: {chain}")], str(path))
    if not p.is_file():
        what = "is a folder, not a config file" if p.is_dir() else "not found"
        where = f" (in the defaults of {_stack[-1]})" if _stack else ""
        raise ConfigError([("", f"config file {what}: {path}{where}")])
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as err:
        raise ConfigError([("", f"YAML syntax error: {err}")], str(path)) from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [("", f"expected a mapping at top level, got {type(data).__name__}")], str(p)
        )
    parents = data.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError([("defaults", "must be a file path or a list of file paths")], str(p))
    merged: dict = {}
    for parent in parents:
        parent_path = (p.parent / parent) if not os.path.isabs(parent) else Path(parent)
        merged = _deep_merge(merged, load_yaml_with_defaults(parent_path, (*_stack, p)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and its YAML-parsed value.

    Raises:
        ConfigError: no ``=``, an empty key segment, no value, or a value YAML cannot parse.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        hint = " (a config file is read with --config FILE)" if ".y" in text[-5:] else ""
        raise ConfigError([("", f"override {text!r} is not of the form key.path=value{hint}")])
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError([(key, f"override {text!r} has an empty key segment")])
    if not raw.strip():  # an unset shell variable (key=$X): YAML would read None ("all", "off")
        fix = f"give a value ({key}=null for none; an empty string is \"{key}=''\" in a shell)"
        raise ConfigError([(key, f"override {text!r} has no value: {fix}")])
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as err:
        raise ConfigError([(key, f"cannot parse override value {raw!r}: {err}")]) from err
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``data`` with dotted ``key.path=value`` overrides applied in order."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError([(where, f"is a value, not a section; cannot set {text!r}")])
            node = child
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# Validation into the schema


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(value: Any, tp: Any, path: str, problems: list) -> Any:
    """Convert a YAML value to ``tp``; append ``(path, message)`` to ``problems`` on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, problems)
        problems.append((path, f"unsupported union type {_type_name(tp)}"))
        return value
    if value is None:
        problems.append((path, f"must not be null (expected {_type_name(tp)})"))
        return None
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            problems.append((path, f"expected a list, got {type(value).__name__} {value!r}"))
            return value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append((path, f"expected a mapping, got {type(value).__name__} {value!r}"))
            return value
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((path, f"expected true or false, got {value!r}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append((path, f"expected an integer, got {type(value).__name__} {value!r}"))
        return value
    if tp is float:
        if isinstance(value, bool):
            problems.append((path, f"expected a number, got {value!r}"))
            return value
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append((path, f"expected a number, got {type(value).__name__} {value!r}"))
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append((path, f"expected a string, got {type(value).__name__} {value!r}"))
        return value
    problems.append((path, f"unsupported field type {_type_name(tp)}"))
    return value


_BOUND_WORDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _range_text(meta: typing.Mapping) -> str:
    """The allowed range of a numeric field, e.g. 'a finite number > 0 and <= 1'."""
    bounds = [f"{word} {meta[key]}" for key, word in _BOUND_WORDS if meta.get(key) is not None]
    return "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")


def _check_meta(value: Any, meta: typing.Mapping, path: str, problems: list) -> None:
    if value is None or isinstance(value, bool) and "choices" not in meta:
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append((path, f"{value!r} is not allowed (must be {_range_text(meta)})"))
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        problems.append((path, f"{value!r} is not one of {', '.join(map(str, choices))}{extra}"))
        return
    if not isinstance(value, int | float):
        return
    for key, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            problems.append((path, f"out of range: {value!r} (must be {word} {bound})"))


def _build_dataclass(cls: type, value: Any, path: str, problems: list) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        problems.append(
            (path, f"expected a section (mapping), got {type(value).__name__} {value!r}")
        )
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, raw in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append((sub, unknown_key_problem(sub, str(key), fields)))
            continue
        n_before = len(problems)
        converted = _convert(raw, hints[key], sub, problems)
        choices = fields[key].metadata.get("choices")
        if len(problems) > n_before and choices is not None:  # a wrong type: name the choices
            problems[-1] = (sub, f"{problems[-1][1]}; one of {', '.join(map(str, choices))}")
        if len(problems) == n_before:
            _check_meta(converted, fields[key].metadata, sub, problems)
        if len(problems) == n_before:
            kwargs[key] = converted
    return cls(**kwargs)


def _resolve_derived(cfg: EAOPDConfig) -> None:
    """Fill fields whose value 0/null means 'derived from other fields'."""
    longest = cfg.rollout.max_prompt_tokens + max(
        cfg.rollout.max_response_tokens, cfg.eval.max_response_tokens
    )
    for m in (cfg.model.student, cfg.model.teacher):
        if m.max_seq_len == 0:
            m.max_seq_len = longest
    if cfg.loss.form is None:
        cfg.loss.form = "exact" if cfg.loss.objective in ("eopd_exact", "jsd") else "sampled"
    if cfg.eval.entropy_threshold is None:
        cfg.eval.entropy_threshold = cfg.loss.entropy_threshold
    if cfg.tokenizer.kind == "auto":
        # a model folder's tokenizer (the teacher's first), else an imported checkpoint's folder,
        # where it still has its tokenizer. The order is part of saved runs' settings (a resume
        # compares the resolved path): a base student's folder may lack the chat turn's end as
        # a stop id, which data.sequences.use_chat_template adds
        hf = cfg.model.teacher_hf or cfg.model.student_hf
        if not hf:
            from megatron_eaopd.config.hf_models import imported_from

            for root in (cfg.model.teacher_checkpoint, cfg.model.student_checkpoint):
                source = imported_from(root)
                if source and os.path.isfile(os.path.join(source, "tokenizer_config.json")):
                    hf = source
                    break
        cfg.tokenizer.kind = "huggingface" if hf else "task"
        if hf and cfg.tokenizer.path is None:
            cfg.tokenizer.path = hf


def longest_rollout_row(cfg: EAOPDConfig) -> int:
    """Positions of the longest row the update's micro-batches can hold: rollout.max_prompt_tokens
    + max_response_tokens, rounded up to the student's tp under sequence parallelism (rows are
    cut at multiples of tp then)."""
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    tp = cfg.parallel.student.tp
    if cfg.parallel.sequence_parallel and tp > 1:
        longest = -(-longest // tp) * tp
    return longest


def _check_consistency(cfg: EAOPDConfig, problems: list, rules: bool = True) -> None:
    """Cross-field rules that a single field's type and range cannot express (with those of
    :mod:`megatron_eaopd.config.rules`)."""
    for who in ("student", "teacher"):
        m = getattr(cfg.model, who)
        lay = getattr(cfg.parallel, who)
        p = f"model.{who}"
        if m.heads % m.query_groups:
            problems.append(
                (f"{p}.query_groups", f"heads={m.heads} is not a multiple of {m.query_groups}")
            )
        if m.kv_channels is None and m.hidden % m.heads:
            problems.append(
                (f"{p}.heads", f"hidden={m.hidden} is not divisible by heads={m.heads}")
            )
        if lay.vpp is not None and lay.pp < 2:
            problems.append((f"parallel.{who}.vpp", "virtual pipeline stages need pp >= 2"))
        for section in ("rollout", "eval"):
            need = cfg.rollout.max_prompt_tokens + getattr(cfg, section).max_response_tokens
            if need > m.max_seq_len:
                problems.append(
                    (
                        f"{p}.max_seq_len",
                        f"{m.max_seq_len} is shorter than rollout.max_prompt_tokens"
                        f" + {section}.max_response_tokens = {need}",
                    )
                )
    r = cfg.rollout
    if r.micro_batch_tokens is not None:
        longest, total = longest_rollout_row(cfg), r.max_prompt_tokens + r.max_response_tokens
        if r.micro_batch_tokens < longest:
            problems.append(
                (
                    "rollout.micro_batch_tokens",
                    f"{r.micro_batch_tokens} is below the longest rollout row "
                    f"(rollout.max_prompt_tokens + max_response_tokens = {total}"
                    + (f", rounded up to {longest} for sequence_parallel "
                       f"(tp={cfg.parallel.student.tp})" if longest != total else "")
                    + f"): set it to at least {longest}, or null for micro_batch_size rows",
                )
            )  # fmt: skip
    if r.mini_batch_size > r.prompts_per_iteration or r.prompts_per_iteration % r.mini_batch_size:
        problems.append(
            (
                "rollout.mini_batch_size",
                f"{r.mini_batch_size} must divide "
                f"rollout.prompts_per_iteration={r.prompts_per_iteration}",
            )
        )
    if cfg.loss.objective in ("eopd_exact", "jsd") and cfg.loss.form != "exact":
        problems.append(("loss.form", f"loss.objective={cfg.loss.objective} needs form exact"))
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        problems.append(("optimizer.min_lr", f"{cfg.optimizer.min_lr} exceeds optimizer.lr"))
    syn = cfg.task.synthetic
    if syn.min_terms > syn.max_terms:
        problems.append(
            ("task.synthetic.min_terms", f"{syn.min_terms} > max_terms={syn.max_terms}")
        )
    if cfg.task.name == "jsonl" and not cfg.task.distill_file:
        problems.append(("task.distill_file", "task.name=jsonl needs a distillation prompt file"))
    name = cfg.task.name
    if name not in ("builtin", "jsonl") and (
        ":" not in name or name.startswith(":") or name.endswith(":")
    ):
        problems.append(
            ("task.name", f"{name!r} is not 'builtin', 'jsonl' or a 'module:Class' path")
        )
    if cfg.model.teacher_checkpoint is None and not cfg.model.teacher_hf:
        if not cfg.teacher_prep.enabled:
            problems.append(
                (
                    "model.teacher_checkpoint",
                    "is null and teacher_prep.enabled is false: the teacher would be untrained; "
                    "give model.teacher_hf or model.teacher_checkpoint, or enable teacher_prep",
                )
            )
        elif cfg.task.name == "jsonl" and not cfg.task.train_file:
            problems.append(
                (
                    "task.train_file",
                    "teacher_prep needs training prompts with solutions "
                    "(or set model.teacher_hf or model.teacher_checkpoint)",
                )
            )
    if cfg.task.name == "builtin" and cfg.rollout.prompts_per_iteration > syn.num_distill:
        problems.append(
            (
                "rollout.prompts_per_iteration",
                f"{cfg.rollout.prompts_per_iteration} exceeds "
                f"task.synthetic.num_distill={syn.num_distill}",
            )
        )
    if cfg.tokenizer.kind != "task" and not cfg.tokenizer.path:
        problems.append(("tokenizer.path", f"tokenizer.kind={cfg.tokenizer.kind} needs a path"))
    if cfg.tokenizer.chat_template and cfg.tokenizer.kind != "huggingface":
        problems.append(
            ("tokenizer.chat_template", "needs tokenizer.kind=huggingface (a template to apply)")
        )
    if rules:  # layouts, warm-up, preparations, task keys, plots
        from megatron_eaopd.config.rules import rule_problems

        problems += rule_problems(cfg)


def config_from_dict(data: dict, source: str | None = None, *, rules: bool = True) -> EAOPDConfig:
    """Validate a plain mapping into :class:`EAOPDConfig`; ``rules=False`` skips the cross-field
    rules of :mod:`config.rules` (to read back a run's saved config.yaml, which an older
    version may have accepted).

    Raises:
        ConfigError: listing every problem with its dotted field path.
    """
    problems: list[tuple[str, str]] = []
    cfg = _build_dataclass(EAOPDConfig, data, "", problems)
    if not problems:
        from megatron_eaopd.config.hf_models import resolve_hf_models

        resolve_hf_models(cfg, data, problems)
    if not problems:
        _resolve_derived(cfg)
        _check_consistency(cfg, problems, rules)
    if not problems:
        from megatron_eaopd.config.hf_models import tokenizer_problems

        tokenizer_problems(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts and lists (what :func:`save_resolved` writes)."""
    return dataclasses.asdict(cfg)


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, rules: bool = True
) -> EAOPDConfig:
    """Load a config file (with its ``defaults:`` chain), apply dotted overrides and validate.

    Args:
        path: the YAML file; None starts from the schema's defaults.
        overrides: ``key.path=value`` strings, applied in order after the files.
        rules: apply the cross-field rules (:func:`config_from_dict`).

    Returns:
        The validated :class:`EAOPDConfig`.

    Raises:
        ConfigError: with the dotted path and the problem for every invalid field.
    """
    data = load_yaml_with_defaults(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return config_from_dict(data, str(path) if path is not None else None, rules=rules)


def save_resolved(cfg: EAOPDConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML (loadable again with :func:`load_config`)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("# resolved megatron-eaopd config (all defaults filled in)\n" + text, "utf-8")
    os.replace(tmp, out)
    return out


def build_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser for ``--config FILE [key.path=value ...]``."""
    parser = argparse.ArgumentParser(prog=prog, description="megatron-eaopd")
    parser.add_argument("--config", "-c", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.top_k=32")
    return parser


# ---------------------------------------------------------------------------------------------
# Field documentation (from the attribute docstrings in schema.py)


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a schema dataclass to its attribute docstring ('' when missing)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                doc = " ".join(str(nxt.value.value).split())
            docs[node.target.id] = doc
    return docs


def describe_fields(
    cls: type = EAOPDConfig, prefix: str = "", instance: Any = None
) -> list[tuple[str, str, Any, str]]:
    """Flatten the schema into ``(dotted_path, type, default, doc)`` rows, sections included."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    instance = cls() if instance is None else instance
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            rows.append((path, "section", None, docs.get(f.name, "")))
            rows += describe_fields(tp, path + ".", default)
        else:
            rows.append((path, _type_name(tp), default, docs.get(f.name, "")))
    return rows
