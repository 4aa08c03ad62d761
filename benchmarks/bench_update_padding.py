"""Benchmark the teacher pass and the update on length-skewed rollouts: micro-batches cut to their
own longest row (the trainer's default), and filled to a token budget (rollout.micro_batch_tokens),
against all padded to the replica's longest row.

``trainer.update.distill_on_rollouts`` (teacher scoring at the teacher's layout, the paper's
sampled EOPD loss, megatron's schedule, DDP, AdamW) on fixed rollouts: ``--rows`` rows of
``--prompt``-token prompts whose response lengths are skewed like on-policy reasoning rollouts
(most end early, a few run to ``--max-response``: lengths drawn from an exponential with mean
``--mean-response``, clipped to [1, max]); ``--steps`` optimizer steps of ``--micro`` rows per
micro-batch. The budget variant: ``--budget`` positions per micro-batch (default ``--micro`` rows
at the longest possible length: the same worst-case memory) and at most ``--budget-rows`` rows
(default all rows of a step). Student and teacher are Qwen3-shaped (``--layers`` x
``--hidden``, the teacher ``--teacher-layers`` deep) with random weights, vocabulary ``--vocab``,
fp32, CPU over gloo with one torch thread per process. Layouts: ``--layouts`` as student TPxPP /
teacher TPxPP on ``tp * pp`` processes (PP 2: megatron's schedule sends each activation's shape
first when the shapes differ). Calls alternate between the variants after a warm-up; the best of
``--reps`` is reported as each process's CPU time (max over ranks) of the teacher pass and of the
update, with the micro-batches and the positions each variant runs through the student (rows x
width summed over micro-batches) against the tokens the sequences hold. All variants compute the
same update: the learning rate is 0 (the weights stay put) and the largest difference between a
variant's last step's gradients and the padded one's, relative to the largest gradient, is
printed. The CPU time of a call is split between teacher pass and update in the ratio of their
wall times.

    python benchmarks/bench_update_padding.py
    python benchmarks/bench_update_padding.py --layouts 1x1/1x1 1x2/1x2 --reps 3
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rollouts(args):
    from megatron_eaopd.rollout import RolloutBatch

    gen = torch.Generator().manual_seed(0)
    lens = torch.empty(args.rows).exponential_(1.0 / args.mean_response, generator=gen)
    response = lens.long().clamp(1, args.max_response)
    prompt = torch.full((args.rows,), args.prompt, dtype=torch.long)
    width = int((prompt + response).max())
    tokens = torch.zeros(args.rows, width, dtype=torch.long)
    logprobs = torch.zeros(args.rows, width)
    for i in range(args.rows):
        n = int(prompt[i] + response[i])
        tokens[i, :n] = torch.randint(3, args.vocab, (n,), generator=gen)
        logprobs[i, prompt[i] : n] = -0.05 - 3.0 * torch.rand(int(response[i]), generator=gen)
    return RolloutBatch(
        tokens=tokens, prompt_lens=prompt, response_lens=response, logprobs=logprobs,
        entropies=torch.zeros(args.rows, width), finished=torch.ones(args.rows, dtype=torch.bool),
    )  # fmt: skip


def _config(args, layers):
    from megatron_eaopd.models import ModelConfig

    return ModelConfig(
        num_layers=layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=max(1, args.heads // 2), kv_channels=args.hidden // args.heads,
        ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab, qk_layernorm=True,
        max_sequence_length=args.prompt + args.max_response, make_vocab_size_divisible_by=8,
        untie_embeddings_and_output_weights=True,
    )  # fmt: skip


def _worker(rank, world, port, args, student_layout, teacher_layout, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    res = measure(args, student_layout, teacher_layout)
    if rank == 0:
        torch.save(res, out_path)
    dist.destroy_process_group()


VARIANTS = ("cut", "budget", "padded")


def _budget(args) -> tuple[int, int]:
    """(positions, most rows) per micro-batch of the budget variant."""
    budget = args.budget or args.micro * (args.prompt + args.max_response)
    return budget, args.budget_rows or args.rows // args.steps


def measure(args, student_layout, teacher_layout) -> dict:
    """In each process of a world of student tp * pp (the launch environment set): every variant
    of ``VARIANTS``, best of ``args.reps``. Returns {"best": {variant: {"teacher", "update" (CPU
    s, max over ranks), "positions", "micro", "shapes"}}, "diff": {variant: the relative
    gradient difference to "padded"}, "tokens", "rows", "longest"}."""
    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.models import build_model, init_weights_layout_invariant
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import initialize_layouts, use_layout
    from megatron_eaopd.trainer.build import build_trainable
    from megatron_eaopd.trainer.update import distill_on_rollouts

    initialize_layouts({"student": (*student_layout, None), "teacher": (*teacher_layout, None)},
                       seed=1, backend="gloo")  # fmt: skip
    with use_layout("teacher"):
        chunks = build_model(_config(args, args.teacher_layers))
        init_weights_layout_invariant(chunks, 2)
        teacher = FrozenTeacher(chunks)
    # lr 0: the weights never move, so every call computes its gradients at the same point
    optim = OptimConfig(lr=0.0, clip_grad=1.0, total_steps=1000)
    with use_layout("student"):
        student = build_trainable(_config(args, args.layers), optim, 1)
    rollouts = _rollouts(args)
    objective = ObjectiveConfig(name="eopd", top_k=16, entropy_threshold=0.8)

    budget, most = _budget(args)
    kwargs = {
        "cut": dict(trim=True, micro_batch_size=args.micro),
        "budget": dict(trim=True, micro_batch_size=most, micro_batch_tokens=budget),
        "padded": dict(trim=False, micro_batch_size=args.micro),
    }

    def call(variant):
        c0 = time.process_time()
        done = distill_on_rollouts(
            student, teacher, objective, rollouts, steps=args.steps, pad_id=0,
            vocab_size=args.vocab, top_k=16, temperature=1.0, **kwargs[variant],
        )  # fmt: skip
        cpu = time.process_time() - c0
        share = done["time_teacher"] / max(done["time_teacher"] + done["time_update"], 1e-9)
        shapes = [tuple(mb["tokens"].shape) for mb in done["micro"]]
        positions = sum(b * s for b, s in shapes)
        return {"teacher": cpu * share, "update": cpu * (1 - share), "positions": positions,
                "micro": len(shapes), "shapes": shapes}  # fmt: skip

    # the same update: the last step's gradients (DDP's main_grad) of one call of each
    grads = {}
    for variant in VARIANTS:
        call(variant)
        grads[variant] = [p.main_grad.clone() for c in student.chunks for p in c.parameters()]
    ref = grads["padded"]
    scale = max(g.abs().max().item() for g in ref)
    diff = {v: max((a - b).abs().max().item() for a, b in zip(grads[v], ref)) / scale
            for v in VARIANTS}  # fmt: skip
    best = dict.fromkeys(VARIANTS)
    for _ in range(args.reps):
        for variant in VARIANTS:
            r = call(variant)
            t = torch.tensor([r["teacher"], r["update"]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            r["teacher"], r["update"] = t.tolist()
            b = best[variant]
            if b is None or r["teacher"] + r["update"] < b["teacher"] + b["update"]:
                best[variant] = r
    lengths = rollouts.prompt_lens + rollouts.response_lens
    return {"best": best, "diff": diff, "tokens": int(lengths.sum()), "rows": len(rollouts),
            "longest": int(lengths.max())}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layout(text):
    student, teacher = text.split("/")
    return tuple(tuple(int(x) for x in part.split("x")) for part in (student, teacher))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1/1x1", "1x2/1x2"],
                        help="student TPxPP / teacher TPxPP, e.g. 1x2/2x1")  # fmt: skip
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--mean-response", type=int, default=96)
    parser.add_argument("--max-response", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=0,
                        help="positions per micro-batch of the budget variant (0: --micro rows "
                             "of prompt + max-response)")  # fmt: skip
    parser.add_argument(
        "--budget-rows",
        type=int,
        default=0,
        help="most rows per micro-batch of the budget variant (0: a step's rows)",
    )
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    budget, most = _budget(args)

    print(
        f"\n### teacher pass + update on length-skewed rollouts: {args.rows} rows, prompt "
        f"{args.prompt}, responses exponential(mean {args.mean_response}) clipped to "
        f"[1, {args.max_response}], {args.steps} steps of micro-batches of {args.micro}; "
        f"student {args.layers} x {args.hidden}, teacher {args.teacher_layers} x {args.hidden},"
        f" vocab {args.vocab}, fp32, 1 thread per process; budget {budget} positions and at "
        f"most {most} rows per micro-batch; best of {args.reps} (CPU s, max over ranks)\n"
    )
    print("| student / teacher (TPxPP) | micro-batches | count | largest (rows x width) | "
          "positions run | tokens | teacher s | update s | total s | speed-up | gradient diff "
          "(rel.) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for text in args.layouts:
        student, teacher = _layout(text)
        world = student[0] * student[1]
        if teacher[0] * teacher[1] > world or world % (teacher[0] * teacher[1]):
            raise SystemExit(f"--layouts {text}: the teacher's TPxPP must divide the student's")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.pt")
            mp.start_processes(_worker, args=(world, _free_port(), args, student, teacher, out),
                               nprocs=world, start_method="spawn")  # fmt: skip
            res = torch.load(out)
        padded = res["best"]["padded"]
        names = {"cut": f"{args.micro} rows, cut to each one's longest",
                 "budget": f"token budget {budget} (at most {most} rows)",
                 "padded": f"{args.micro} rows, padded to the longest"}  # fmt: skip
        for variant in VARIANTS:
            r = res["best"][variant]
            total = r["teacher"] + r["update"]
            speed = (padded["teacher"] + padded["update"]) / total
            b, w = max(r["shapes"], key=lambda bs: bs[0] * bs[1])
            print(
                f"| {text} | {names[variant]} | {r['micro']} | {b} x {w} | {r['positions']} | "
                f"{res['tokens']} | {r['teacher']:.2f} | {r['update']:.2f} | {total:.2f} | "
                f"{speed:.2f}x | {res['diff'][variant]:.1e} |"
            )


if __name__ == "__main__":
    main()
