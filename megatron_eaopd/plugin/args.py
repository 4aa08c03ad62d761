"""Command-line flags for Megatron-LM scripts: ``add_eopd_args`` for ``extra_args_provider``.

    from megatron.training import pretrain
    from megatron_eaopd.plugin import add_eopd_args, eopd_settings_from_args
    pretrain(..., extra_args_provider=add_eopd_args)
    settings = eopd_settings_from_args(get_args())   # objective, teacher source and layout

Every flag maps onto the project's config schema (``loss.*`` of docs/configs.md) and is
validated by the same loader: a bad value is a ``ConfigError`` naming the flag and its config
key.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["EOPDSettings", "add_eopd_args", "eopd_settings_from_args"]

# flag -> (config key under loss., type, help)
_LOSS_FLAGS = {
    "objective": (str, "opd | eopd | eopd_exact | eopd_soft | mix | fkl | jsd (loss.objective)"),
    "tau": (float, "entropy threshold tau in nats (loss.entropy_threshold; paper 0.8)"),
    "alpha": (float, "weight of the gated forward KL (loss.fkl_coef; paper 1.0)"),
    "topk": (int, "teacher top-k of the forward KL (loss.top_k; paper 16)"),
    "clip": (float, "PPO ratio clip (loss.clip; paper 0.2)"),
    "temperature": (float, "logit temperature of both models (loss.temperature)"),
    "form": (str, "sampled | exact (loss.form; default by objective)"),
    "tail-bucket": (None, "add the mass outside the top-k as one bucket (loss.tail_bucket)"),
    "gate-strict": (None, "gate with H > tau instead of H >= tau (loss.gate_strict)"),
    "chunk-size": (int, "tokens per chunk of the loss kernels (loss.chunk_size)"),
    "fused-output": (
        None,
        "compute the loss from the final hidden states and the output weight "
        "shard, no logits (loss.fused_output; eopd_forward_step's fused)",
    ),
    "fused-chunk-size": (int, "tokens per chunk of the fused loss (loss.fused_chunk_size)"),
    "soft-gate-width": (float, "eopd_soft: gate sigmoid((H - tau) / width) (loss.soft_gate_width)"),
    "mix-weight": (float, "mix: weight of the forward KL (loss.mix_weight)"),
    "jsd-beta": (float, "jsd: interpolation beta, in (0, 1) (loss.jsd_beta)"),
}
_KEYS = {"tau": "entropy_threshold", "alpha": "fkl_coef", "topk": "top_k"}
#: config key -> the flag that sets it (errors name both)
_FLAG_OF = {f"loss.{_KEYS.get(f, f.replace('-', '_'))}": f"--eopd-{f}" for f in _LOSS_FLAGS}
_FLAG_OF["rollout.temperature"] = "--eopd-temperature"  # the flag sets both temperatures


def add_eopd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--eopd-*`` flags (an ``extra_args_provider`` for Megatron-LM); returns parser.

    Flags: --eopd-teacher (HF folder or project checkpoint), --eopd-teacher-tp / -pp (default:
    the student's), and the loss flags --eopd-objective, --eopd-tau, --eopd-alpha, --eopd-topk,
    --eopd-clip, --eopd-temperature, --eopd-form, --eopd-tail-bucket, --eopd-gate-strict,
    --eopd-chunk-size, --eopd-fused-output, --eopd-fused-chunk-size, --eopd-soft-gate-width,
    --eopd-mix-weight, --eopd-jsd-beta (defaults: the schema's, i.e.
    the paper's; the plugin's loss is unfused unless --eopd-fused-output is given).
    """
    group = parser.add_argument_group("EOPD distillation (megatron-eaopd)")
    group.add_argument(
        "--eopd-teacher",
        type=str,
        default=None,
        help="teacher: a Hugging Face folder or a megatron-eaopd checkpoint",
    )
    group.add_argument(
        "--eopd-teacher-tp",
        type=int,
        default=None,
        help="teacher tensor-parallel size (default: the student's)",
    )
    group.add_argument("--eopd-teacher-pp", type=int, default=None,
                       help="teacher pipeline-parallel size (default: the student's)")  # fmt: skip
    for flag, (tp, text) in _LOSS_FLAGS.items():
        name = f"--eopd-{flag}"
        if tp is None:
            group.add_argument(name, action="store_true", default=None, help=text)
        else:
            group.add_argument(name, type=tp, default=None, help=text)
    return parser


@dataclass(frozen=True)
class EOPDSettings:
    """What the flags say: the loss (``losses.ObjectiveConfig`` and the schema's
    ``LossConfig``), the teacher's source and layout (None: the student's)."""

    objective: object
    loss: object
    teacher: str | None
    teacher_tp: int | None
    teacher_pp: int | None


def eopd_settings_from_args(args: argparse.Namespace) -> EOPDSettings:
    """Map parsed ``--eopd-*`` flags onto the config schema and validate them with the loader.

    Raises:
        ConfigError: a bad value, named by its flag and config key (``--eopd-tau
            (loss.entropy_threshold)``);
            Megatron-LM's ``--reset-attention-mask`` / ``--reset-position-ids`` (document
            masking: the teacher would score other contexts than the student sees).
    """
    from megatron_eaopd.config import ConfigError, config_from_dict, objective_kwargs
    from megatron_eaopd.config.checks import fused_jsd_problem
    from megatron_eaopd.losses import ObjectiveConfig

    loss = {}
    for flag in _LOSS_FLAGS:
        value = getattr(args, "eopd_" + flag.replace("-", "_"), None)
        if value is not None:
            loss[_KEYS.get(flag, flag.replace("-", "_"))] = value
    if "temperature" in loss:  # the sampled form checks the two agree: the flag sets both
        data = {"loss": loss, "rollout": {"temperature": loss["temperature"]}}
    else:
        data = {"loss": loss}
    try:
        cfg = config_from_dict(data, source="--eopd-* flags")
    except ConfigError as err:  # name the flag the user wrote, beside its config key
        raise ConfigError(
            [(_named(k), text) for k, text in err.problems], "--eopd-* flags"
        ) from None
    from megatron_eaopd.config.rules import loss_key_problems

    # a flag the objective ignores is refused here (the trainer only warns: inherited keys)
    problems = [(_named(k), text) for k, text in loss_key_problems(cfg)]
    for flag in ("teacher-tp", "teacher-pp"):
        value = getattr(args, "eopd_" + flag.replace("-", "_"), None)
        if value is not None and value < 1:
            problems.append(
                (f"--eopd-{flag}", f"must be >= 1 (omit it: the student's), got {value}")
            )
    if fused_jsd_problem(cfg.loss):
        problems.append(("--eopd-fused-output", fused_jsd_problem(cfg.loss)))
    for flag in ("reset_attention_mask", "reset_position_ids"):  # Megatron-LM's own flags
        if getattr(args, flag, False):
            problems.append((
                "--" + flag.replace("_", "-"),
                "document masking is not supported: the teacher scores every sequence with "
                "plain causal attention and position ids 0..s-1, so the student must see the "
                "same; drop the flag",
            ))  # fmt: skip
    if problems:
        raise ConfigError(problems, "--eopd-* flags")
    objective = ObjectiveConfig(**objective_kwargs(cfg.loss))
    return EOPDSettings(
        objective=objective,
        loss=cfg.loss,
        teacher=getattr(args, "eopd_teacher", None),
        teacher_tp=getattr(args, "eopd_teacher_tp", None),
        teacher_pp=getattr(args, "eopd_teacher_pp", None),
    )


def _named(key: str) -> str:
    """``--eopd-tau (loss.entropy_threshold)`` for a config key a flag sets, else the key."""
    return f"{_FLAG_OF[key]} ({key})" if key in _FLAG_OF else key
