"""How many rows an evaluation decodes at once, so that it needs no more KV cache than the run's
rollouts (the trainer's rule; ``eaopd-plan`` plans the same).

With ``rollout.max_decode_batch`` null, a rollout decodes all of a replica's rows at once (the
largest replica: ``prompts_per_iteration / mini_batch_size`` steps of :func:`replica_step_rows`)
of ``max_prompt_tokens + max_response_tokens`` positions, which is what the run is sized for.
An evaluation has ``eval.k`` samples for each of its prompts, often longer
(``eval.max_response_tokens``), and for the teacher too: decoded all at once, MATH500's 500
prompts x k 8 on 2 replicas are 2,000 rows of 9,216 positions, hundreds of GiB of KV cache per
rank at paper scale. So evaluations decode at most as many rows as keep their KV cache within a
rollout's (rows x positions x KV bytes per position of the model, per rank), refilling finished
rows with waiting prompts (continuous batching: the tokens are the same whatever the batch). A
set ``rollout.max_decode_batch`` is used as it is, for rollouts and evaluations alike.
"""

from __future__ import annotations

__all__ = ["eval_decode_rows", "kv_bytes_per_position", "replica_step_rows"]

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def kv_bytes_per_position(model, tp: int, pp: int) -> int:
    """KV-cache bytes one rank holds per decoded position of a ``config.ModelConfig`` at (tp,
    pp): 2 (K, V) x layers / pp x max(1, query_groups / tp) x head dim x dtype bytes."""
    head_dim = model.kv_channels or model.hidden // model.heads
    groups = max(1, model.query_groups // tp)
    return 2 * (model.layers // pp) * groups * head_dim * _BYTES[model.dtype]


def replica_step_rows(cfg, dp: int) -> list[int]:
    """Rows per optimizer step of the student's replicas, fewest first: the trainer deals each
    mini-batch's prompts round-robin (``trainer.update.replica_prompts``), so a replica gets the
    ceiling or the floor of ``mini_batch_size / dp`` prompts, with all their samples (a replica
    with none is left out)."""
    r = cfg.rollout
    shares = {-(-r.mini_batch_size // dp), r.mini_batch_size // dp} - {0}
    return sorted(p * r.samples_per_prompt for p in shares)


def eval_decode_rows(cfg, who: str, dp_student: int) -> int:
    """Rows one replica of ``who`` ("student" or "teacher") decodes at once in an evaluation:
    ``rollout.max_decode_batch`` when set, else the most whose KV cache per rank is at most a
    rollout's (at least 1). ``dp_student``: the student's data-parallel size (the rollouts'
    replicas). No communication."""
    r = cfg.rollout
    if r.max_decode_batch:
        return r.max_decode_batch
    steps = r.prompts_per_iteration // r.mini_batch_size
    rows = steps * replica_step_rows(cfg, dp_student)[-1]  # the largest replica's rollout
    s, lay = cfg.model.student, cfg.parallel.student
    budget = rows * (r.max_prompt_tokens + r.max_response_tokens)
    budget *= kv_bytes_per_position(s, lay.tp, lay.pp)
    model, lay = getattr(cfg.model, who), getattr(cfg.parallel, who)
    per_row = (r.max_prompt_tokens + cfg.eval.max_response_tokens) * kv_bytes_per_position(
        model, lay.tp, lay.pp
    )
    return max(1, budget // per_row)
