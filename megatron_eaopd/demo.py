"""Loss demo on the CPU: distil a low-rank vocab-parallel student into a fixed teacher with OPD
(reverse KL only) and with EOPD (plus forward KL where the teacher's entropy exceeds tau), and
report how much of the teacher's high-entropy mass each student keeps.

The student's logits are [s, b, V/tp] shards of h @ W_r (hidden 8, W split over the vocabulary
across TP ranks), so it cannot match the teacher exactly: reverse KL alone is mode-seeking and
lowers the student's entropy at the teacher's uncertain positions; EOPD's gated forward KL keeps
it. Run on 2 gloo ranks (TP 2):

    torchrun --nproc-per-node 2 -m megatron_eaopd.demo
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from megatron_eaopd.losses import ObjectiveConfig, exact_objective


def _teacher_logits(positions, vocab, rank, tp, seed):
    """Teacher: half the positions peaked (low entropy), half spread over a few tokens."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(positions, vocab, generator=g) * 0.5
    top = torch.randint(0, vocab, (positions, 6), generator=g)
    peaked = torch.arange(positions) % 2 == 0
    full[peaked, top[peaked, 0]] += 12.0
    for j in range(4):  # uncertain positions: 4 near-equal modes
        full[~peaked, top[~peaked, j]] += 7.0 - 0.3 * j
    w = vocab // tp
    return full[:, rank * w : (rank + 1) * w].contiguous()


def run(objective: str, steps: int, group, rank: int, tp: int, seed: int = 0):
    positions, vocab, hidden = 64, 512, 8
    teacher = _teacher_logits(positions, vocab, rank, tp, seed).unsqueeze(1)  # [s, 1, V/tp]
    g = torch.Generator().manual_seed(seed + 1)
    h = torch.nn.Parameter(torch.randn(positions, hidden, generator=g) * 0.1)
    w_full = torch.randn(hidden, vocab, generator=g) * 0.1
    w = torch.nn.Parameter(w_full[:, rank * vocab // tp : (rank + 1) * vocab // tp].clone())
    opt = torch.optim.Adam([h, w], lr=0.05)
    cfg = ObjectiveConfig(name=objective, form="exact")
    for step in range(steps + 1):
        logits = (h @ w).unsqueeze(1)  # [s, 1, V/tp]
        loss, m = exact_objective(cfg, logits, teacher, tp_group=group)
        opt.zero_grad()
        loss.mean().backward()
        if tp > 1:  # h is replicated across TP ranks: its gradient is a sum over vocab shards
            dist.all_reduce(h.grad, group=group)
        opt.step()
        if rank == 0 and step % (steps // 4) == 0:
            print(
                f"{objective:5s} step {step:4d}  loss {loss.mean().item():.4f}  "
                f"rkl {m['rkl'].mean().item():.4f}  fkl {m['fkl'].mean().item():.4f}  "
                f"gated {m['gate'].mean().item():.2f}",
                flush=True,
            )
    tau = cfg.entropy_threshold
    return {
        "teacher_high_entropy": (m["teacher_entropy"] >= tau).float().mean().item(),
        "student_high_entropy": (m["student_entropy"] >= tau).float().mean().item(),
        "fkl_on_high_entropy": m["fkl"][m["teacher_entropy"] >= tau].mean().item(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="OPD vs EOPD loss demo over TP ranks (gloo)")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    group = dist.group.WORLD if dist.is_initialized() else None
    rank = dist.get_rank() if group else 0
    tp = dist.get_world_size() if group else 1
    results = {name: run(name, args.steps, group, rank, tp) for name in ("opd", "eopd")}
    if rank == 0:
        print(f"\nTP={tp}  fraction of positions with entropy > 0.8 nats, and forward KL there:")
        print("| objective | teacher | student | FKL on high-entropy |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| {name} | {r['teacher_high_entropy']:.2f} | {r['student_high_entropy']:.2f} "
                f"| {r['fkl_on_high_entropy']:.3f} |"
            )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
