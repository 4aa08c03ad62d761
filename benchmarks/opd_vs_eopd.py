"""OPD vs EOPD on one config over several seeds: run the trainer, then tabulate and plot.

Each (objective, seed) is one ``eaopd-train`` run under torchrun in ``<out>/<objective>-s<seed>``
(a finished run is not repeated; an interrupted one resumes). The teacher is prepared once (its
cache is shared). Then the final evaluation of every run is summarised as mean +- standard
deviation over seeds, and the eval curves are drawn with the spread as a band.

    python benchmarks/opd_vs_eopd.py --config configs/tiny-cpu.yaml --seeds 1 2 3 \
        --out runs/compare --plot docs/opd_vs_eopd.png [dotted.overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = (
    "mean/avg@8", "mean/pass@8", "mean/pass@1", "student_high_frac", "teacher_high_frac",
    "fkl_high", "fkl_all", "student_entropy", "response_length",
)  # fmt: skip


def _records(path: str, split: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["split"] == split]


def _finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(os.path.join(run_dir, "checkpoints", "latest"), encoding="utf-8") as f:
        latest = int(f.read().strip().split("_")[1])
    import yaml

    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
        total = yaml.safe_load(f)["training"]["iterations"]
    return latest == total


def run_one(args, objective: str, seed: int) -> str:
    run_dir = os.path.join(args.out, f"{objective}-s{seed}")
    if os.path.isdir(run_dir) and _finished(run_dir):
        print(f"{run_dir}: done already", flush=True)
        return run_dir
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.nproc}", "-m", "megatron_eaopd.cli", "--config", args.config,
        f"loss.objective={objective}", f"training.seed={seed}", f"training.output_dir={run_dir}",
        "logging.progress_bars=false", *args.overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    with open(os.path.join(args.out, f"{objective}-s{seed}.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{run_dir}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(args, runs: dict) -> dict:
    summary = {"final": {}, "curves": {}, "teacher": {}, "start": {}}
    for objective, dirs in runs.items():
        finals = [_records(os.path.join(d, "metrics.jsonl"), "eval")[-1] for d in dirs]
        starts = [_records(os.path.join(d, "metrics.jsonl"), "eval")[0] for d in dirs]
        summary["final"][objective] = {m: _mean_sd([f.get(m) for f in finals]) for m in METRICS}
        summary["start"][objective] = {m: _mean_sd([s.get(m) for s in starts]) for m in METRICS}
        teacher = [_records(os.path.join(d, "metrics.jsonl"), "teacher") for d in dirs]
        teacher = [t[0] for t in teacher if t]
        if teacher:
            summary["teacher"] = {m: _mean_sd([t.get(m) for t in teacher]) for m in METRICS}
        by_iter: dict[int, list[dict]] = {}
        for d in dirs:
            for row in _records(os.path.join(d, "metrics.jsonl"), "eval"):
                by_iter.setdefault(row["iteration"], []).append(row)
        for m in METRICS:
            pts = [(i, *_mean_sd([r.get(m) for r in rows])) for i, rows in sorted(by_iter.items())]
            summary["curves"].setdefault(m, {})[objective] = pts
    return summary


def print_table(summary: dict, seeds) -> None:
    objectives = list(summary["final"])
    print(f"\nfinal evaluation, mean +- sd over seeds {list(seeds)}")
    print("| metric | " + " | ".join(objectives) + " | start (iteration 0) |")
    print("|---|" + "---|" * (len(objectives) + 1))
    for m in METRICS:
        cells = [f"{summary['final'][o][m][0]:.4f} +- {summary['final'][o][m][1]:.4f}"
                 for o in objectives]  # fmt: skip
        start = summary["start"][objectives[0]][m]
        print(f"| {m} | " + " | ".join(cells) + f" | {start[0]:.4f} +- {start[1]:.4f} |")
    if summary["teacher"]:
        t = summary["teacher"]
        print(f"teacher: avg@8 {t['mean/avg@8'][0]:.4f}, pass@8 {t['mean/pass@8'][0]:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--objectives", nargs="+", default=["opd", "eopd"])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--plot", default=None, help="PNG path for the curves (needs matplotlib)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = {o: [run_one(args, o, s) for s in args.seeds] for o in args.objectives}
    summary = summarise(args, runs)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print_table(summary, args.seeds)
    if args.plot:
        sys.path.insert(0, ROOT)
        from megatron_eaopd.eval import plot_curves

        keys = ("mean/pass@8", "mean/avg@8", "student_high_frac", "fkl_high")
        curves = {k: summary["curves"][k] for k in keys}
        out = plot_curves(curves, args.plot, title=f"OPD vs EOPD, {len(args.seeds)} seeds")
        print(f"plot: {out}")


if __name__ == "__main__":
    main()
