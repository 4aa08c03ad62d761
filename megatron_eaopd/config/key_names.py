"""What an unknown config key is told: a removed key's reason, the key a peer's name stands for,
the same key in another section, or a close spelling.

Users come from verl, NeMo-RL, TRL and Megatron's own arguments, and write the names they know
(``loss.alpha``, ``rollout.n``, ``training.train_iters``). :func:`unknown_key_problem` names our
key for each of them instead of a bare "unknown key". Reads the schema only.
"""

from __future__ import annotations

import difflib
import functools

from megatron_eaopd.config.schema import EAOPDConfig

__all__ = ["EXPLAINED", "PEER_NAMES", "REMOVED_KEYS", "unknown_key_problem"]

# Keys that existed once and were removed: a config that still sets one gets this reason instead
# of "unknown key".
REMOVED_KEYS = {
    "rollout.engine": (
        "was removed: it was never read; the project's own sampler (megatron_eaopd.rollout) is "
        "the only rollout engine. Delete the key"
    ),
}

_PEERS = {  # our key: the names the paper, verl, NeMo-RL, TRL or Megatron use for it
    "loss.fkl_coef": ("alpha", "fkl_weight"),
    "loss.entropy_threshold": ("tau", "entropy_tau", "threshold"),
    "loss.top_k": ("k", "topk_logits_k", "num_topk"),
    "loss.clip": ("clip_ratio", "clip_eps", "epsilon", "ratio_clip"),
    "rollout.samples_per_prompt": ("n", "num_samples", "n_samples", "num_generations"),
    "rollout.prompts_per_iteration": ("batch_size", "train_batch_size", "num_prompts"),
    "rollout.max_response_tokens": ("max_new_tokens", "response_length", "max_tokens"),
    "rollout.max_prompt_tokens": ("prompt_length", "max_prompt_length"),
    "eval.k": ("samples_per_prompt", "n", "num_samples", "n_samples", "pass_k"),
    "eval.max_response_tokens": ("max_new_tokens", "response_length", "max_tokens"),
    "optimizer.lr": ("learning_rate",),
    "optimizer.warmup_iterations": ("warmup_steps", "lr_warmup_iters"),
    "optimizer.clip_grad": ("max_grad_norm", "grad_clip"),
    "training.iterations": ("max_steps", "train_iters", "total_steps", "num_steps"),
    "training.checkpoint_interval": ("save_interval", "save_steps"),
    "training.checkpoint_dir": ("save", "save_dir"),
    "training.eval_interval": ("eval_steps", "test_freq"),
    "training.recompute": (
        "recompute_granularity",
        "activation_checkpointing",
        "gradient_checkpointing",
        "enable_gradient_checkpointing",
    ),
}
#: Peers' keys for what EOPD does not have: the reason, instead of a near spelling of ours.
EXPLAINED = {
    "loss.kl_coef": (
        "verl's kl_coef weights a KL penalty against a reference policy, which EOPD does not "
        "have; the weight of the entropy-gated forward KL is loss.fkl_coef"
    ),
    "loss.lmbda": (
        "TRL GKD's lmbda is the fraction of on-policy batches; EOPD is on-policy throughout "
        "(the student samples every response)"
    ),
    "loss.beta": (
        "TRL GKD's beta is loss.jsd_beta (with loss.objective=jsd); TRL GRPO's and verl's beta "
        "weights a KL penalty against a reference policy, which EOPD does not have"
    ),
    "training.eval_iters": (
        "Megatron's eval_iters is the number of evaluation batches; evaluations here run "
        "eval.max_prompts prompts (every one: null) x eval.k samples, every "
        "training.eval_interval iterations"
    ),
}
#: ``section.name`` a user may write -> our key (the name is read in that section).
PEER_NAMES = {
    f"{key.rsplit('.', 1)[0]}.{name}": key for key, names in _PEERS.items() for name in names
}


_IN_ITERATIONS = (
    ", counted in iterations: one iteration is rollout.prompts_per_iteration / "
    "rollout.mini_batch_size optimizer steps (optimizer.warmup_iterations counts steps)"
)
# what a peer's user must know besides the name: Megatron and TRL count optimizer steps
_NOTES = {
    "training.iterations": _IN_ITERATIONS,
    "training.checkpoint_interval": _IN_ITERATIONS,
    "training.eval_interval": _IN_ITERATIONS,
    "optimizer.warmup_iterations": ", which counts optimizer steps (as warmup_steps does)",
}
#: a peer's bare name -> our key, where the name stands for one key only (n: rollout or eval)
_BY_NAME = {name: key for key, names in _PEERS.items() for name in names
            if sum(name in other for other in _PEERS.values()) == 1}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _schema_paths() -> tuple[str, ...]:
    """Every dotted key of the schema (model.student.layers, ...)."""
    from megatron_eaopd.config.loader import config_to_dict, flatten  # loader imports this module

    return tuple(flatten(config_to_dict(EAOPDConfig())))


def unknown_key_problem(sub: str, key: str, fields) -> str:
    """The message for ``sub`` (dotted path, last part ``key``) that is not one of ``fields`` (the
    section's field names): the removed key's reason, else the hint, else the known keys."""
    if sub in REMOVED_KEYS:
        return REMOVED_KEYS[sub]
    if sub in EXPLAINED:
        return f"unknown key: {EXPLAINED[sub]}"
    elsewhere = [p for p in _schema_paths() if p.rsplit(".", 1)[-1] == key and p != sub]
    # eval.samples_per_prompt: eval.k, not rollout.samples_per_prompt; then a peer's name in
    # another section (training.lr_warmup_iters) where it stands for one key of ours
    ours = PEER_NAMES.get(sub) or (None if elsewhere else _BY_NAME.get(key))
    if ours is not None:
        return f"unknown key; this project calls it {ours}{_NOTES.get(ours, '')}"
    hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
    if elsewhere:  # the right key in another section: training.warmup_iterations
        extra = f"; it is a key of another section: {' or '.join(elsewhere)}"
    else:
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
    known = "" if hint or elsewhere else f" (known keys: {', '.join(fields)})"
    return f"unknown key{extra}{known}"
