"""eaopd-plan: per-rank memory and communication of one EOPD iteration, and which GPUs it fits.

    eaopd-plan --config configs/qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml [key=value ...] [--world-size 8]

Reads the config as eaopd-train does (defaults chain, dotted overrides, validation) and prints,
for the largest pipeline stage of each model, the persistent state (weights, fp32 gradient
buffer, Adam state, the teacher's weights) and each phase's transients (rollout KV cache, teacher
scoring, the student update under each training.recompute setting, the loss as logits
or fused chunks, the teacher payload or, in the exact form, the teacher's logits shard or hidden
states kept for the iteration) under the student's sequence parallelism when it is on, the peak,
the GPUs it fits (90% of 40 / 80 / 141 GB), the most rows at the length limit per micro-batch
that each GPU fits (what to set `rollout.micro_batch_tokens` to: `rows_that_fit`), and the bytes
each rank sends per iteration. The model is `plan.memory` (docs/memory.md).

A model given as a Hugging Face folder takes its shape from the folder's config.json; when the
folder is not there (planning before the download), `--student-preset` / `--teacher-preset`
name a built-in shape (`models.config.PRESETS`), or the folder's name picks one (Qwen3-8B ->
qwen3-8b, Qwen3-1.7B-Base -> qwen3-1.7b); a checkpoint that records no shape needs shape keys or
the preset flag. A vocabulary size of 0 (the tokenizer's) needs `--vocab-size`. Exit status 2 on
a bad config or argument, and on a layout eaopd-train refuses (``trainer.checks.layout_problems``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_eaopd.config.loader import longest_rollout_row
from megatron_eaopd.plan.memory import (
    GIB,
    GPUS,
    Batch,
    Layout,
    Shape,
    budget_worst_case,
    combined,
    fits,
    padded_vocab,
    plan_memory,
)
from megatron_eaopd.trainer.decode_rows import eval_decode_rows, replica_step_rows

EXIT_BAD_INPUT = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eaopd-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (as for eaopd-train)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument(
        "--world-size", type=_positive_int, default=8, help="GPUs in the job (default 8)"
    )
    p.add_argument("--vocab-size", type=_positive_int, default=None, help="when the config's is 0")
    p.add_argument("--student-preset", default=None, help="shape when student_hf is missing")
    p.add_argument("--teacher-preset", default=None, help="shape when teacher_hf is missing")
    p.add_argument(
        "--spec", default="te", choices=("te", "local"),
        help="activation accounting: te (GPU, flash attention) or local (CPU)",
    )  # fmt: skip
    p.add_argument(
        "--distributed-optimizer", action="store_true",
        help="optimizer state split over the student's DP ranks, as megatron's "
        "--use-distributed-optimizer (the plugin inside your own Megatron job; eaopd-train's "
        "trainer keeps the whole state on every rank, the default here)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def _preset_for(who: str, folder: str | None, name: str | None):
    """(name, preset ModelConfig or None): ``name`` (any case) or the folder's name picks it;
    ValueError for an explicit name that is not a preset, listing the names."""
    from megatron_eaopd.models.config import PRESETS

    if name is not None:
        if name.lower() not in PRESETS:
            raise ValueError(
                f"--{who}-preset {name!r} is not a preset; the presets: {', '.join(PRESETS)}"
            )
        return name.lower(), PRESETS[name.lower()]
    base = os.path.basename(os.path.normpath(folder or "")).lower()
    name = base[: -len("-base")] if base.endswith("-base") else base
    return (name, PRESETS[name]) if name in PRESETS else (name, None)


# training.recompute -> the plan's peak with that update (plan_config's variants)
PEAK_KEYS = {"none": "peak", "selective": "peak_selective", "full": "peak_recompute"}


def _same_value(given, value) -> bool:
    """A YAML value against a preset's: numbers compared as numbers (YAML reads ``1e-6`` and
    ``1e6`` as strings, which the schema coerces)."""
    if isinstance(value, bool) or isinstance(given, bool):
        return given == value
    if isinstance(value, (int, float)):
        try:
            return float(given) == float(value)
        except (TypeError, ValueError):
            return False
    return given == value


def _apply_preset(model: dict, who: str, name: str, preset, source: str, notes: list) -> None:
    """Write the preset's shape into ``model[who]``; ValueError where a given shape key
    disagrees (the preset would have replaced it without a word)."""
    from megatron_eaopd.config.hf_models import schema_shape

    section = model.setdefault(who, {})
    shape = schema_shape(preset)
    clash = [
        f"model.{who}.{k}={section[k]!r} (the preset: {v!r})"
        for k, v in shape.items()
        if k in section
        and not _same_value(section[k], v)
        and not (k == "vocab_size" and section[k] == 0)
    ]
    if clash:
        raise ValueError(
            f"{source}: the preset {name}'s shape disagrees with {', '.join(clash)}: remove the "
            f"key or pass --{who}-preset of the model you mean"
        )  # fmt: skip
    section.update(shape)
    notes.append(f"{who}: {source}; shape of the preset {name}")


def load_plan_config(path: str, overrides, student_preset=None, teacher_preset=None):
    """The validated config, HF folders that are not on disk replaced by preset shapes.
    Returns (cfg, notes). Raises ValueError (or ConfigError) naming the problem: besides the
    loader's, a layout eaopd-train refuses, a ``model.<who>_checkpoint`` that records no shape
    (missing, incomplete) without shape keys or a preset, and a ``--<who>-preset`` no model
    uses or that is not a preset."""
    from megatron_eaopd.config.hf_models import recorded_model_config
    from megatron_eaopd.config.loader import (
        apply_overrides,
        config_from_dict,
        load_yaml_with_defaults,
    )

    data = apply_overrides(load_yaml_with_defaults(path), overrides)
    model = data.setdefault("model", {})
    notes = []
    replaced = False
    shape_keys = ("layers", "hidden", "heads", "ffn_hidden")
    for who, preset_name in (("student", student_preset), ("teacher", teacher_preset)):
        folder, root = model.get(f"{who}_hf"), model.get(f"{who}_checkpoint")
        if folder:
            if os.path.isfile(os.path.join(folder, "config.json")):
                if preset_name is not None:
                    raise ValueError(
                        f"--{who}-preset {preset_name}: model.{who}_hf={folder!r} is on disk "
                        "and its config.json gives the shape; drop the flag"
                    )
                continue
            name, preset = _preset_for(who, folder, preset_name)
            if preset is None:
                raise ValueError(
                    f"model.{who}_hf={folder!r} has no config.json and no preset matches its "
                    f"name: pass --{who}-preset NAME (models.config.PRESETS) or download it"
                )
            _apply_preset(model, who, name, preset, f"{folder} is not on disk", notes)
            model[f"{who}_hf"] = None
            replaced = True
        elif root and recorded_model_config(root) is None:
            # a typo, or a save not made yet: the defaults' 2-layer toy was planned silently
            if preset_name is not None:
                name, preset = _preset_for(who, None, preset_name)
                _apply_preset(model, who, name, preset, f"{root} records no model", notes)
                continue
            if not any(k in (model.get(who) or {}) for k in shape_keys):
                raise ValueError(
                    f"model.{who}_checkpoint={root!r} records no model config (missing, not a "
                    "complete save, or an old one), so its shape is unknown: pass "
                    f"--{who}-preset NAME or the shape keys (model.{who}.layers=..., hidden, "
                    "heads, ffn_hidden, ...)"
                )
        elif preset_name is not None:
            raise ValueError(
                f"--{who}-preset {preset_name}: the config's {who} takes its shape from "
                f"{'the checkpoint ' + root if root else 'its model.' + who + ' keys'}; drop "
                "the flag (it applies to a model.<who>_hf folder not on disk)"
            )
    if replaced:  # the planner needs shapes only: no teacher weights, tokenizer or prompts
        if not model.get("teacher_hf"):  # the teacher's folder, when still on disk, stays
            model.setdefault("teacher_checkpoint", "planned")
        kept = model.get("teacher_hf") or model.get("student_hf")  # a folder still on disk
        data.setdefault("tokenizer", {}).update(kind="huggingface" if kept else "task",
                                                chat_template=False, path=kept)  # fmt: skip
        data.setdefault("teacher_prep", {})["enabled"] = False
        data.setdefault("task", {}).update(name="builtin")
        for key in ("distill_file", "eval_files", "train_file", "prompt_suffix", "options"):
            data["task"].pop(key, None)  # read by other tasks only: refused with builtin
        data.setdefault("rollout", {})
        training = data.setdefault("training", {})
        if training.get("iterations") is None:  # the run's length came from the real task's
            training["iterations"] = 10**6  # prompts: no run-length check against builtin's
    cfg = config_from_dict(data, path)
    for who in ("student", "teacher"):
        given = getattr(cfg.model, f"{who}_hf") or getattr(cfg.model, f"{who}_checkpoint")
        section = model.get(who) or {}
        if not given and not any(k in section for k in shape_keys):
            notes.append(
                f"{who}: no model.{who}_hf, model.{who}_checkpoint or shape keys in this config:"
                " the schema's default shape is planned (a base config, not a run by itself?)"
            )
    from megatron_eaopd.trainer.checks import layout_problems

    refused = layout_problems(cfg)
    if refused:
        raise ValueError("eaopd-train refuses this layout:\n  " + "\n  ".join(refused))
    from megatron_eaopd.config.checks import sequence_parallel_problem

    problem = sequence_parallel_problem(cfg)
    if problem is not None:
        raise ValueError(f"parallel.sequence_parallel: {problem}")
    if cfg.parallel.sequence_parallel:
        notes.append(
            "parallel.sequence_parallel: the student's norm inputs and outputs, the linears' "
            "inputs before their all-gather and the residual parts are planned split over tp"
        )
    if cfg.loss.form == "exact":
        notes.append(
            "loss.form=exact: the teacher's logits shard (logits column) or final hidden states "
            "(fused column) of every row of the iteration are kept from scoring to the last step"
        )
    return cfg, notes


def _shape(m, vocab: int | None, who: str = "student") -> Shape:
    v = m.vocab_size or vocab
    if not v:
        raise ValueError(
            f"model.{who}.vocab_size is 0 (the tokenizer's): pass --vocab-size N (or set the key)"
        )
    return Shape(
        layers=m.layers, hidden=m.hidden, heads=m.heads, query_groups=m.query_groups,
        ffn_hidden=m.ffn_hidden, vocab_size=int(v), kv_channels=m.kv_channels,
        tied=m.tied_embeddings, qk_layernorm=m.qk_layernorm, dtype=m.dtype,
    )  # fmt: skip


def plan_config(cfg, world: int, vocab: int | None = None, spec: str = "te",
                distributed_optimizer: bool = False) -> dict:  # fmt: skip
    """Everything eaopd-plan prints, as plain numbers (bytes). `distributed_optimizer`: the
    optimizer state split over the student's DP ranks (megatron's --use-distributed-optimizer)."""
    from megatron_eaopd.losses.objectives import ObjectiveConfig

    if world < 1:
        raise ValueError(f"--world-size {world} must be >= 1")
    if vocab is not None and vocab < 1:
        raise ValueError(f"--vocab-size {vocab} must be >= 1")
    student = _shape(cfg.model.student, vocab, "student")
    teacher = _shape(cfg.model.teacher, vocab, "teacher")
    lay = {}
    for who in ("student", "teacher"):
        p = getattr(cfg.parallel, who)
        if world % (p.tp * p.pp):
            raise ValueError(
                f"--world-size {world} is not a multiple of parallel.{who}.tp * pp = {p.tp} * "
                f"{p.pp} = {p.tp * p.pp}: give a multiple of {p.tp * p.pp}"
            )
        lay[who] = Layout(p.tp, p.pp, world // (p.tp * p.pp))
    r = cfg.rollout
    dp = lay["student"].dp
    steps = r.prompts_per_iteration // r.mini_batch_size
    counts = replica_step_rows(cfg, dp)  # rows per step of a replica, as the trainer deals
    per_step = counts[-1]
    rows = steps * per_step  # the largest replica's rows per iteration
    seq = r.max_prompt_tokens + r.max_response_tokens
    worst = None
    if r.micro_batch_tokens is None:

        def divisor(n: int) -> int:  # trainer.batches.largest_divisor
            return max(d for d in range(1, min(r.micro_batch_size, n) + 1) if n % d == 0)

        # each replica cuts its own rows: plan the widest micro-batch and the most of them
        mb = max(divisor(n) for n in counts)
        count = max(n // divisor(n) for n in counts)
    else:
        multiple = lay["student"].tp if cfg.parallel.sequence_parallel else 1
        mb, worst, count = budget_worst_case(
            r.micro_batch_tokens, r.micro_batch_size, per_step, seq, multiple
        )
    loss = cfg.loss
    fused_on = ObjectiveConfig(
        name="eopd" if loss.objective == "eopd_exact" else loss.objective, form=loss.form,
        fused_output=loss.fused_output,
    ).use_fused  # fmt: skip
    div = cfg.parallel.make_vocab_size_divisible_by
    chunk = (loss.fused_chunk_size or 0) * padded_vocab(student.vocab_size, lay["student"].tp, div)
    batch = Batch(
        micro_batch=mb, seq=seq, micro_batches=count, steps=steps, rows=rows,
        micro_tokens=worst[0] * worst[1] if worst else None,
        step_positions=per_step * longest_rollout_row(cfg) if worst else None,
        top_k=loss.top_k, chunk_elems=(chunk // lay["student"].tp) or (1 << 24),
        decode_rows=min(rows, r.max_decode_batch) if r.max_decode_batch else None,
        eval_rows={who: eval_decode_rows(cfg, who, dp) for who in ("student", "teacher")},
        eval_seq=r.max_prompt_tokens + cfg.eval.max_response_tokens,
    )  # fmt: skip
    sp = bool(cfg.parallel.sequence_parallel)
    out = {"world": world, "spec": spec, "fused": fused_on, "form": loss.form,
           "sequence_parallel": sp, "recompute": cfg.training.recompute,
           "distributed_optimizer": bool(distributed_optimizer),
           "batch": batch.__dict__,
           "layouts": {k: v.__dict__ for k, v in lay.items()}, "variants": {},
           "vocab": {"student": student.vocab_size, "teacher": teacher.vocab_size}}  # fmt: skip
    for fused in (True, False):
        rs, rt = plan_memory(student, teacher, lay["student"], lay["teacher"], batch,
                             fused=fused, spec=spec, divisible_by=div, form=loss.form,
                             sequence_parallel=sp, recompute=cfg.training.recompute,
                             distributed_optimizer=distributed_optimizer)  # fmt: skip
        tot = combined(rs, rt)
        out["variants"]["fused" if fused else "logits"] = {
            "parts": tot.parts, "comm": tot.comm, "persistent": tot.persistent,
            **{key: tot.peak(mode) for mode, key in PEAK_KEYS.items()},
            "peak_configured": tot.peak(cfg.training.recompute),  # training.recompute's
        }  # fmt: skip
    return out


def rows_that_fit(cfg, world: int, vocab: int | None = None, spec: str = "te",
                  distributed_optimizer: bool = False) -> dict:  # fmt: skip
    """What to set for each GPU: the most rows at the length limit per micro-batch with which the
    plan's peak (loss.fused_output's variant, training.recompute's update) fits it (a smaller
    count need not: under pipeline parallelism more micro-batches can be in flight). Each count
    k is planned as the token budget k x the limit (rounded up to tp under sequence parallelism)
    with micro_batch_size the rows of a step: the largest micro-batch any lengths can make under
    it.
    Returns {"limit": positions of one row at the limit, "rows_per_step", "rows": {GPU: k (0:
    not even one row fits)}}: set rollout.micro_batch_tokens to k x limit with micro_batch_size
    at least k (the trainer's fixed micro-batches use the largest divisor of the rows per step
    that is at most micro_batch_size)."""
    import copy

    s = cfg.parallel.student
    limit = longest_rollout_row(cfg)
    per_step = replica_step_rows(cfg, max(world // (s.tp * s.pp), 1))[-1]  # the largest
    found = dict.fromkeys(GPUS, 0)
    trial = copy.deepcopy(cfg)
    trial.rollout.micro_batch_size = per_step
    for k in range(1, per_step + 1):  # every k: the peak need not grow with k (fewer in flight)
        trial.rollout.micro_batch_tokens = k * limit
        plan = plan_config(trial, world, vocab, spec, distributed_optimizer)
        chosen = "fused" if plan["fused"] else "logits"
        peak = plan["variants"][chosen]["peak_configured"]
        for gpu, fit in fits(peak).items():
            if fit:
                found[gpu] = k
    return {"limit": limit, "rows_per_step": per_step, "rows": found}


def format_plan(plan: dict, cfg, notes=()) -> str:
    """The plain-text table eaopd-plan prints."""
    b, lay = plan["batch"], plan["layouts"]
    lines = [
        f"world size {plan['world']}; activation spec {plan['spec']}; loss form {plan['form']}; "
        f"sequence parallel {'on' if plan['sequence_parallel'] else 'off'}; training.recompute "
        f"{plan.get('recompute', 'none')}; optimizer state "
        + (
            "split over DP (distributed optimizer)"
            if plan.get("distributed_optimizer")
            else "whole on every DP rank"
        )
    ]
    lines += [f"note: {n}" for n in notes]
    for who in ("student", "teacher"):
        m, ly = getattr(cfg.model, who), lay[who]
        lines.append(
            f"{who}: {m.layers} layers, hidden {m.hidden}, heads {m.heads}/{m.query_groups}, "
            f"ffn {m.ffn_hidden}, vocab {plan['vocab'][who]}, {m.dtype}; TP {ly['tp']} x PP "
            f"{ly['pp']}"
            f" x DP {ly['dp']}"
        )
    if b.get("micro_tokens"):
        rows, positions = b["micro_batch"], b["micro_tokens"]
        lines.append(
            f"batch per student replica: {b['rows']} rows of up to {b['seq']} tokens per "
            f"iteration, {b['steps']} steps of at most {b['micro_batches']} micro-batches of at "
            f"most rollout.micro_batch_tokens={cfg.rollout.micro_batch_tokens} positions; "
            f"planned at the largest the budget lets through: {rows} rows of "
            f"{positions // rows} = {positions} positions"
        )
    else:
        lines.append(
            f"batch per student replica: {b['rows']} rows of {b['seq']} tokens per iteration, "
            f"{b['steps']} steps of {b['micro_batches']} micro-batches of {b['micro_batch']} rows"
        )
    if b.get("eval_rows"):
        rollout = f"{b['decode_rows']} rows at once" if b.get("decode_rows") else "all at once"
        lines.append(
            f"decoding: rollouts {rollout}; evaluations at most {b['eval_rows']['student']} "
            f"(student) / {b['eval_rows']['teacher']} (teacher) rows at once of up to "
            f"{b['eval_seq']} tokens per replica (rollout.max_decode_batch; unset, a rollout's KV "
            "cache: docs/trainer.md)"
        )
    chosen = "fused" if plan["fused"] else "logits"
    lines.append(f"loss.fused_output resolves to {plan['fused']}: the '{chosen}' column applies")
    f_, u_ = plan["variants"]["fused"], plan["variants"]["logits"]
    lines.append("")
    lines.append(f"{'GiB per rank (largest stage)':<48} {'fused':>9} {'logits':>9}")
    for key in f_["parts"]:
        lines.append(f"{key:<48} {f_['parts'][key] / GIB:9.2f} {u_['parts'][key] / GIB:9.2f}")
    for mode, key in PEAK_KEYS.items():
        label = f"peak, {'no' if mode == 'none' else mode} recompute"
        lines.append(f"{label:<48} {f_[key] / GIB:9.2f} {u_[key] / GIB:9.2f}")
    lines.append("")
    configured = plan.get("recompute", "none")
    for mode, key in PEAK_KEYS.items():
        ok = fits(plan["variants"][chosen][key])
        this = ", this config" if mode == configured else ""
        lines.append(
            f"fits ({chosen}, training.recompute={mode}{this}): "
            + ", ".join(f"{gpu} {'yes' if y else 'no'}" for gpu, y in ok.items())
        )
    fit = plan.get("rows_that_fit")
    if fit:

        def told(k: int) -> str:
            if k == 0:
                return "none"
            every = " (all of a step's)" if k == fit["rows_per_step"] else ""
            return f"{k}{every}: micro_batch_tokens={k * fit['limit']}"

        lines.append(
            f"most rows at the limit ({fit['limit']} tokens) per micro-batch that fit ({chosen}, "
            f"training.recompute={configured}; with rollout.micro_batch_size at least that): "
            + ", ".join(f"{g} {told(k)}" for g, k in fit["rows"].items())
        )
    lines.append("")
    lines.append(f"{'GiB sent per rank per iteration':<48} {'fused':>9} {'logits':>9}")
    for key in f_["comm"]:
        lines.append(f"{key:<48} {f_['comm'][key] / GIB:9.3f} {u_['comm'][key] / GIB:9.3f}")
    total_f, total_u = sum(f_["comm"].values()), sum(u_["comm"].values())
    lines.append(f"{'total':<48} {total_f / GIB:9.3f} {total_u / GIB:9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_eaopd.config.loader import ConfigError

    try:
        cfg, notes = load_plan_config(
            args.config, args.overrides, args.student_preset, args.teacher_preset
        )
        plan = plan_config(
            cfg, args.world_size, args.vocab_size, args.spec, args.distributed_optimizer
        )
        plan["rows_that_fit"] = rows_that_fit(
            cfg, args.world_size, args.vocab_size, args.spec, args.distributed_optimizer
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"eaopd-plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(plan, indent=1, default=float))
    else:
        print(format_plan(plan, cfg, notes))
    return 0


__all__ = ["GPUS", "format_plan", "load_plan_config", "main", "plan_config", "rows_that_fit"]


if __name__ == "__main__":
    sys.exit(main())
