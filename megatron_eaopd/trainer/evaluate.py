"""Sampling prompts, checking answers, and the held-out evaluation.

Evaluation samples ``eval.k`` responses per held-out prompt from the student (``eval.temperature``,
``eval.top_p``, ``eval.top_k``) and reports, per eval set and averaged over sets:

* ``<set>/avg@k``, ``<set>/pass@k`` (unbiased estimator), also ``pass@1``;
* on the student's own eval samples, per response token: ``student_high_frac`` and
  ``teacher_high_frac`` (fractions of tokens whose full-vocabulary entropy is at least tau, or
  above it with ``loss.gate_strict``, under each model, on the same tokens), ``fkl_high``
  (forward KL(teacher || student) averaged over the teacher's high-entropy tokens) and
  ``fkl_all`` (over all tokens). The forward KL is taken on the teacher's top-k set plus one tail
  bucket for the rest of the vocabulary: the KL between the two distributions coarsened to k + 1
  outcomes, a lower bound of the full-vocabulary forward KL.

With ``eval.save_samples`` (default: the first 16 prompts of each set) it also writes the
responses, whether each is right and the task's reason when not, to
``<output_dir>/eval_samples/<who>_iter_<iteration>.jsonl`` (rank 0 writes; the replicas of its
tensor- and pipeline-parallel slice send their records to it with one gather_object).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_eaopd.data.prepare import evaluated_problems
from megatron_eaopd.data.task import Problem
from megatron_eaopd.eval import summarize_samples
from megatron_eaopd.rollout import RolloutBatch, SamplingParams, generate
from megatron_eaopd.trainer.batches import largest_divisor, step_micro_batches
from megatron_eaopd.trainer.build import STUDENT, TEACHER
from megatron_eaopd.trainer.decode_rows import eval_decode_rows
from megatron_eaopd.trainer.scoring import score_with_teacher
from megatron_eaopd.trainer.update import distill_forward_step, reduce_outputs

logger = logging.getLogger(__name__)

__all__ = [
    "check_responses",
    "decode",
    "evaluate",
    "pad_id_of",
    "sample_problems",
    "sample_records",
    "seeded_generator",
    "write_samples",
]


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded by a hash of ``parts`` (e.g. seed, "rollout", iteration, dp_rank)."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id (the project's ``pad_id``, HF's ``pad_token_id``), else EOS."""
    for name in ("pad_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and value >= 0:
            return int(value)
    from megatron_eaopd.data.sequences import eos_id

    return eos_id(tokenizer)


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Response text (special tokens dropped)."""
    if hasattr(tokenizer, "sp"):
        return tokenizer.decode(ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def sample_problems(
    model,
    problems: Sequence[Problem],
    n: int,
    tokenizer,
    *,
    max_new_tokens: int,
    params: SamplingParams,
    vocab_size: int,
    generator: torch.Generator,
    use_kv_cache: bool = True,
    max_batch: int | None = None,
    progress=None,
    pp_interleave: bool = False,
    decode_graphs: bool = False,
) -> RolloutBatch:
    """``n`` responses per problem (rows ``i * n ... i * n + n - 1`` belong to problem i).

    Runs under the current megatron layout (the model's). Collectives: those of ``generate``.
    """
    from megatron_eaopd.data.sequences import encode_prompt, stop_token_ids

    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems for _ in range(n)]
    return generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_id=stop_token_ids(tokenizer),
        pad_id=pad_id_of(tokenizer),
        vocab_size=vocab_size,
        params=params,
        generator=generator,
        use_kv_cache=use_kv_cache,
        max_batch=max_batch,
        progress=progress,
        pp_interleave=pp_interleave,
        decode_graphs=decode_graphs,
    )


def check_responses(task, tokenizer, problems, rollouts: RolloutBatch, n: int) -> list[list[bool]]:
    """Correctness of each problem's ``n`` responses (rows grouped as in sample_problems)."""
    out = []
    for i, problem in enumerate(problems):
        row = []
        for j in range(n):
            text = decode(tokenizer, rollouts.response_ids(i * n + j))
            row.append(bool(task.check(text, problem)))
        out.append(row)
    return out


def sample_records(data, name, problems, rollouts, rows, keep, dp_rank, dp, k) -> list[dict]:
    """JSON-ready records of the kept problems' ``k`` responses each: the set's name, the
    problem's index in the set (``dp_rank + i * dp`` for this replica's i-th problem), uid,
    prompt, and per response its text, token count, whether it is right (``rows``) and, if not,
    the task's reason (:meth:`Task.explain`). Local; no collective."""
    out = []
    for i in keep:
        problem, responses = problems[i], []
        for j in range(k):
            row = i * k + j
            text = decode(data.tokenizer, rollouts.response_ids(row))
            responses.append({
                "text": text,
                "tokens": int(rollouts.response_lens[row]),
                "correct": rows[i][j],
                "why": None if rows[i][j] else data.task.explain(text, problem),
            })  # fmt: skip
        out.append({
            "set": name, "index": dp_rank + i * dp, "uid": problem.uid,
            "prompt": problem.prompt, "responses": responses,
        })  # fmt: skip
    return out


def write_samples(output_dir: str, who: str, iteration: int, records: list[dict]) -> str | None:
    """Write ``records`` (sorted by set and index) as JSON lines (ASCII, escapes for the rest) to
    ``<output_dir>/eval_samples/<who>_iter_<iteration:07d>.jsonl`` (replacing a file of the same
    evaluation, e.g. after a resume) through a temporary file; return the path. The samples are
    a diagnostic: a failed write (disk full, permissions) is logged as a warning and returns
    None, so it never stops the run (and no other rank waits on it)."""
    folder = os.path.join(output_dir, "eval_samples")
    path = os.path.join(folder, f"{who}_iter_{iteration:07d}.jsonl")
    tmp = path + ".tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for record in sorted(records, key=lambda r: (r["set"], r["index"])):
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        logger.warning("evaluation samples not saved to %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return None
    return path


def _gather_rows(rows: list, group, first_only: bool = False) -> list:
    """Concatenate per-rank lists over a group (data-parallel ranks hold different prompts): on
    every rank (all_gather_object), or with ``first_only`` on the group's first rank only
    (gather_object; the other ranks get an empty list)."""
    if group is None or dist.get_world_size(group=group) == 1:
        return rows
    size, first = dist.get_world_size(group=group), dist.get_global_rank(group, 0)
    if not first_only:
        parts = [None] * size
        dist.all_gather_object(parts, rows, group=group)
    else:
        parts = [None] * size if dist.get_rank() == first else None
        dist.gather_object(rows, parts, dst=first, group=group)
    return [r for part in parts for r in part] if parts is not None else []


def evaluate(trainer, iteration: int, who: str = "student") -> dict[str, float]:
    """Held-out evaluation of the student (or, ``who="teacher"``, accuracy of the teacher).

    Call on every rank. The prompts of each set are dealt round-robin over the data-parallel
    replicas, so replicas may hold different numbers of prompts (none, for small sets): sampling
    makes no collective across replicas, the answers are gathered as objects, and the teacher
    exchange and the metric all-reduces are made by every rank whatever its share. Returns the
    metrics dict (the same on every rank).
    """
    from megatron.core import parallel_state as ps

    from megatron_eaopd.parallel.init import compute_device, use_layout

    cfg, data = trainer.cfg, trainer.data
    ev = cfg.eval
    params = SamplingParams(
        temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k,
        logprob_temperature=cfg.loss.temperature,
    )  # fmt: skip
    tau = ev.entropy_threshold if ev.entropy_threshold is not None else cfg.loss.entropy_threshold
    layout = TEACHER if who == "teacher" else STUDENT
    model = trainer.teacher if who == "teacher" else trainer.student.chunks
    # at most a rollout's KV cache (trainer.decode_rows): 2,000 rows at once ran out of memory
    student = cfg.parallel.student
    decode_rows = eval_decode_rows(cfg, who, dist.get_world_size() // (student.tp * student.pp))
    results, sums, lengths, saved = {}, {}, [0.0, 0.0], []
    for name, problems in data.eval_sets.items():
        problems = evaluated_problems(problems, ev.max_prompts)
        with use_layout(layout):
            dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            mine = problems[dp_rank::dp]  # replicas may get different counts, even none
            gen = seeded_generator(cfg.training.seed, "eval", who, name, iteration, dp_rank)
            rollouts, rows = None, []
            if mine:
                bar = trainer.progress(len(mine) * ev.k, f"eval {who} {name}")
                rollouts = sample_problems(
                    model, mine, ev.k, data.tokenizer, max_new_tokens=ev.max_response_tokens,
                    params=params, vocab_size=data.vocab_size, generator=gen,
                    use_kv_cache=cfg.rollout.use_kv_cache, max_batch=decode_rows,
                    progress=bar.update if bar is not None else None,
                    pp_interleave=cfg.rollout.pp_interleave,
                    decode_graphs=cfg.rollout.cuda_graphs,
                )  # fmt: skip
                if bar is not None:
                    bar.close()
                rows = check_responses(data.task, data.tokenizer, mine, rollouts, ev.k)
                lengths[0] += float(rollouts.response_lens.sum())
                lengths[1] += len(rollouts)
            group = ps.get_data_parallel_group() if dp > 1 else None
            results[name] = _gather_rows(rows, group)
            first_slice = (
                ps.get_tensor_model_parallel_rank() == 0
                and ps.get_pipeline_model_parallel_rank() == 0
            )  # global rank 0's replicas: the others hold the same rollouts
            if ev.save_samples != 0 and first_slice:
                limit = len(problems) if ev.save_samples is None else ev.save_samples
                keep = [i for i in range(len(mine)) if dp_rank + i * dp < limit]
                records = sample_records(data, name, mine, rollouts, rows, keep, dp_rank, dp, ev.k)
                saved.extend(_gather_rows(records, group, first_only=True))
        if who == "student":
            for key, value in _entropy_sums(trainer, rollouts, tau).items():
                sums[key] = sums.get(key, 0.0) + value
    if saved and trainer.rank0:
        write_samples(cfg.training.output_dir, who, iteration, saved)
    metrics = summarize_samples(results, ks=range(1, ev.k + 1))  # the Pass@k curve
    with use_layout(layout):
        if ps.get_data_parallel_world_size() > 1:
            t = torch.tensor(lengths, dtype=torch.float64, device=compute_device())
            dist.all_reduce(t, group=ps.get_data_parallel_group())
            lengths = t.tolist()
    metrics["response_length"] = lengths[0] / max(lengths[1], 1.0)
    if sums:
        metrics.update(entropy_metrics(sums))
    return metrics


def entropy_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The entropy metrics from the token sums of :func:`_entropy_sums` (summed over sets).

    Fractions and means over all response tokens, ``fkl_high`` over the tokens whose teacher
    entropy is above the threshold: NaN when there is none (a mean of nothing, not a zero
    divergence; ``metrics.jsonl`` writes it as null and the console as n/a), as
    ``eval.metrics.high_entropy_fkl`` does.
    """
    n_tokens = max(sums["n"], 1e-12)
    n_gated = sums["n_gated"]
    return dict(
        student_high_frac=sums["student_high_entropy"] / n_tokens,
        teacher_high_frac=sums["teacher_high_entropy"] / n_tokens,
        fkl_high=sums["fkl_gated"] / n_gated if n_gated > 0 else float("nan"),
        fkl_all=sums["fkl"] / n_tokens,
        student_entropy=sums["student_entropy"] / n_tokens,
        teacher_entropy=sums["teacher_entropy"] / n_tokens,
    )


def _entropy_sums(trainer, rollouts: RolloutBatch | None, tau: float) -> dict[str, float]:
    """Token sums of the entropy metrics on one set's student rollouts (all ranks agree)."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.sequence_parallel import sequence_multiple
    from megatron_eaopd.models.student import run_forward_backward
    from megatron_eaopd.parallel.init import compute_device, use_layout

    cfg, data = trainer.cfg, trainer.data
    objective = dataclasses.replace(
        trainer.objective, name="eopd", form="sampled", entropy_threshold=tau, tail_bucket=True
    )
    mbs, budget = cfg.rollout.micro_batch_size, cfg.rollout.micro_batch_tokens
    micro, seq = [], 0
    if rollouts is not None and len(rollouts) > 0:  # None: this replica had no prompts
        if budget is None:
            mbs = largest_divisor(len(rollouts), mbs)
        (micro,) = step_micro_batches(
            rollouts,
            pad_id_of(data.tokenizer),
            mbs,
            multiple=sequence_multiple(trainer.student.chunks),
            max_tokens=budget,
        )
        mbs = max(mb["tokens"].shape[0] for mb in micro)
        seq = max(mb["tokens"].shape[1] for mb in micro)
    score_with_teacher(
        trainer.teacher, micro, k=cfg.loss.top_k, vocab_size=data.vocab_size,
        temp=cfg.loss.temperature, chunk_size=cfg.loss.chunk_size, fused=objective.use_fused,
        fused_chunk_size=objective.fused_chunk_size,
    )  # fmt: skip
    with use_layout(STUDENT):
        outputs = []
        if micro:
            with torch.no_grad():  # no backward: the fused loss makes no gradients in forward
                outputs = run_forward_backward(
                    trainer.student.chunks, distill_forward_step(objective, data.vocab_size),
                    iter(micro), len(micro), seq, mbs, forward_only=True,
                    micro_batches=micro,
                )  # fmt: skip
        names = ["fkl", "fkl_gated", "student_entropy", "student_high_entropy", "teacher_entropy",
                 "teacher_high_entropy", "gate"]  # fmt: skip
        means = reduce_outputs(list(outputs or []), names)
        n = torch.tensor(
            [float(sum(int(mb["loss_mask"].sum()) for mb in micro))], device=compute_device()
        )
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(n, group=ps.get_data_parallel_group())
    n = float(n)
    out = {k: means[k] * n for k in names if k != "fkl_gated"}
    n_gated = means["gate"] * n
    out.update(n=n, n_gated=n_gated, fkl_gated=means["fkl_gated"] * n_gated)
    return out
