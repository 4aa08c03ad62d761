"""Write a task the package does not know about as JSONL files: remainders by repeated subtraction.

A problem is a number N, a divisor d and the allowed multipliers M (1 and one to three others
from 2..5). A solution subtracts any allowed multiple m*d that still fits, one step at a time,
until what is left is below d; that is N mod d, whatever the path::

    prompt:    71%8 by 1,3,4:
    solution:  -3*8=47;-4*8=15;-1*8=7;\\boxed{7}

So every problem has many valid solutions, the multiplier at each step is a genuine branch point
(ln 2 .. ln 4 nats under a uniform choice) and every other token is determined. The answer is
judged by the JSONL path's boxed-answer check, not by comparing with one solution: any path that
ends at the right remainder counts.

Files (the JSONL schema of docs/tasks.md: ``prompt``, ``answer``, ``solutions`` on the train file,
anything else kept as metadata):

    <out>/train.jsonl     training problems with up to --solutions distinct solutions each
    <out>/distill.jsonl   the distillation prompts (no solutions)
    <out>/heldout.jsonl   the held-out evaluation prompts (no solutions)

The three splits are disjoint and a pure function of --seed and the sizes. Run with the study:

    python benchmarks/make_remainder_task.py --out runs/remainder-task
    python benchmarks/opd_vs_eopd.py --config configs/tiny-cpu.yaml --out runs/remainder \\
        task.name=jsonl task.train_file=runs/remainder-task/train.jsonl \\
        task.distill_file=runs/remainder-task/distill.jsonl \\
        "task.eval_files=[runs/remainder-task/heldout.jsonl]"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random

DIVISORS = range(3, 9)
MULTIPLIERS = (2, 3, 4, 5)
MAX_N = 72
MAX_STEPS = 8  # N < (MAX_STEPS + 1) * d: even the all-ones path has at most 8 steps


def all_problems() -> list[tuple[int, int, tuple[int, ...]]]:
    """Every (N, d, M) of the task: d in 3..8, 3d <= N < 9d, N <= 72, M = (1, *some of 2..5)."""
    sets = [(1, *extra) for r in (1, 2, 3) for extra in itertools.combinations(MULTIPLIERS, r)]
    return [
        (n, d, m)
        for d in DIVISORS
        for n in range(3 * d, min(MAX_N, (MAX_STEPS + 1) * d - 1) + 1)
        for m in sets
    ]


def prompt(n: int, d: int, mults: tuple[int, ...]) -> str:
    return f"{n}%{d} by {','.join(map(str, mults))}:"


def sample_solution(n: int, d: int, mults: tuple[int, ...], rng: random.Random) -> str:
    """One solution, the multiplier drawn uniformly from those that fit at every step."""
    steps, left = [], n
    while left >= d:
        m = rng.choice([m for m in mults if m * d <= left])
        left -= m * d
        steps.append(f"-{m}*{d}={left};")
    return "".join(steps) + f"\\boxed{{{left}}}"


def check(response: str, n: int, d: int) -> bool:
    """The boxed answer equals N mod d (what the JSONL path's answer check judges)."""
    return response.endswith(f"\\boxed{{{n % d}}}")


def build(seed: int, num_train: int, num_distill: int, num_eval: int, solutions: int):
    """(train, distill, heldout) lists of JSON records, disjoint, drawn in that order of need:
    the eval set first, so it does not change when the other sizes do."""
    problems = all_problems()
    need = num_train + num_distill + num_eval
    if need > len(problems):
        raise SystemExit(f"asked for {need} problems; the task has only {len(problems)}")
    random.Random(seed).shuffle(problems)
    heldout = problems[:num_eval]
    distill = problems[num_eval : num_eval + num_distill]
    train = problems[num_eval + num_distill : need]
    rng = random.Random(seed + 1)

    def record(split, i, p, with_solutions):
        n, d, mults = p
        rec = {"id": f"{split}-{i}", "prompt": prompt(n, d, mults), "answer": n % d,
               "n": n, "d": d, "multipliers": list(mults)}  # fmt: skip
        if with_solutions:
            sols = []
            for _ in range(8 * solutions):  # distinct solutions, as many as exist up to the cap
                s = sample_solution(n, d, mults, rng)
                if s not in sols:
                    sols.append(s)
                if len(sols) == solutions:
                    break
            assert all(check(s, n, d) for s in sols)
            rec["solutions"] = sols
        return rec

    return (
        [record("train", i, p, True) for i, p in enumerate(train)],
        [record("distill", i, p, False) for i, p in enumerate(distill)],
        [record("heldout", i, p, False) for i, p in enumerate(heldout)],
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/remainder-task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=1200)
    p.add_argument("--num-distill", type=int, default=400)
    p.add_argument("--num-eval", type=int, default=64)
    p.add_argument("--solutions", type=int, default=8, help="distinct solutions per train problem")
    args = p.parse_args()
    sizes = {"--num-train": args.num_train, "--num-distill": args.num_distill,
             "--num-eval": args.num_eval, "--solutions": args.solutions}  # fmt: skip
    small = [f"{k} {v}" for k, v in sizes.items() if v < 1]
    if small:  # a negative size used to slice silently (--num-train -5 wrote 0 train problems)
        p.error(f"sizes must be >= 1: {', '.join(small)}")
    os.makedirs(args.out, exist_ok=True)
    splits = build(args.seed, args.num_train, args.num_distill, args.num_eval, args.solutions)
    for name, rows in zip(("train", "distill", "heldout"), splits):
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{path}: {len(rows)} problems")


if __name__ == "__main__":
    main()
