"""OPD vs EOPD on one config over several seeds: run the trainer, then tabulate and plot.

Each (objective, seed) is one ``eaopd-train`` run in ``<out>/<objective>-s<seed>`` (under torchrun
with ``--nproc`` processes; ``--nproc 1`` runs one process with TP = 1 for both models, which gives
the same models and statistics at less communication cost). A finished run is not repeated and an
interrupted one resumes from its last checkpoint, so rerunning the same command continues an
interrupted study. The teacher and the student warm start are prepared once (their caches are
shared by all runs). Then every metric of the evaluations is summarised over seeds as mean and 95%
confidence interval (Student's t), and written as Markdown tables (final evaluation, Pass@k for
k = 1..8, the high-entropy fractions over training) and a PNG of the curves with the CI as a band.

    python benchmarks/opd_vs_eopd.py --config configs/tiny-cpu.yaml --seeds 1 2 3 4 5 \\
        --out runs/compare --plot docs/opd_vs_eopd.png [dotted.overrides ...]

(Overrides go after a single-valued option as here, or after ``--``: ``--seeds 1 2 -- key=v``.)
Arms other than plain objectives: ``--arm "NAME OVERRIDE..."`` (one quoted string, repeatable)
adds an arm with its own overrides, and ``--preset ablation`` runs the ablation of docs/results.md
(tau, top-k, tail bucket, objective variants; ``ablation_arms``). Arms with the same name share run
folders, so the ablation reuses the seeds an OPD vs EOPD study already ran in the same ``--out``.
``--jobs N`` runs N trainings at once (after the first, which prepares the shared caches alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = (
    "mean/avg@8", "mean/pass@8", "mean/pass@1", "student_high_frac", "teacher_high_frac",
    "fkl_high", "fkl_all", "student_entropy", "teacher_entropy", "response_length",
)  # fmt: skip
PASS_K = tuple(f"mean/pass@{k}" for k in range(1, 9))
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    if df in _T95:
        return _T95[df]
    below = [d for d in _T95 if d < df]
    return _T95[max(below)] if df <= 30 else 1.96


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% confidence interval, n) of the non-missing values."""
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan"), 0
    if len(values) == 1:
        return values[0], 0.0, 1
    sd = statistics.stdev(values)
    return statistics.mean(values), t95(len(values) - 1) * sd / math.sqrt(len(values)), len(values)


def _records(path: str, split: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["split"] == split]


def _finished(run_dir: str) -> bool:
    latest_file = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or not os.path.exists(
        latest_file
    ):
        return False
    with open(latest_file, encoding="utf-8") as f:
        latest = int(f.read().strip().split("_")[1])
    import yaml

    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
        total = yaml.safe_load(f)["training"]["iterations"]
    evals = _records(os.path.join(run_dir, "metrics.jsonl"), "eval")
    return latest == total and bool(evals) and evals[-1]["iteration"] == total


# The sampled block's optimiser settings (docs/results.md 0.1: the sampled-token estimator needs a
# smaller step than the exact form at this mini-batch size; measured in 0.5)
SAMPLED_SCHEDULE = ["optimizer.lr=5e-4"]
FULL_VOCAB_K = 36  # the built-in countdown task's tokenizer: 36 pieces


def ablation_arms() -> dict[str, list[str]]:
    """The ablation's arms: name -> overrides on top of the study's config and overrides.

    Exact block (the default config's form): OPD and EOPD, tau in {0.4, 1.2}, the soft gate, the
    fixed mix, forward KL only and JSD. Sampled block (the paper's form, top-k forward KL from the
    teacher's payload, where top-k and the tail bucket matter): OPD, EOPD at k = 16, k = 4, k = 36,
    k = 16 with the tail bucket. k = 36 is the built-in task's whole vocabulary (its tokenizer has
    36 pieces, so the issue's k = 64 does not exist there and the trainer refuses it): the forward
    KL over the whole vocabulary on the sampled form's side. The tau arms keep
    ``eval.entropy_threshold`` at the paper's 0.8, so the high-entropy fractions of every arm are
    measured at the same threshold.
    """
    sampled = ["loss.form=sampled", *SAMPLED_SCHEDULE]
    same_eval_tau = ["eval.entropy_threshold=0.8"]
    return {
        "opd": ["loss.objective=opd"],
        "eopd": ["loss.objective=eopd"],
        "eopd-tau0.4": ["loss.objective=eopd", "loss.entropy_threshold=0.4", *same_eval_tau],
        "eopd-tau1.2": ["loss.objective=eopd", "loss.entropy_threshold=1.2", *same_eval_tau],
        "eopd_soft": ["loss.objective=eopd_soft"],
        "mix": ["loss.objective=mix"],
        "fkl": ["loss.objective=fkl"],
        "jsd": ["loss.objective=jsd"],
        "sampled-opd": ["loss.objective=opd", *sampled],
        "sampled-eopd": ["loss.objective=eopd", *sampled],
        "sampled-eopd-k4": ["loss.objective=eopd", "loss.top_k=4", *sampled],
        "sampled-eopd-k36": ["loss.objective=eopd", f"loss.top_k={FULL_VOCAB_K}", *sampled],
        "sampled-eopd-tail": ["loss.objective=eopd", "loss.tail_bucket=true", *sampled],
    }


# keys that do not change what a run computes: where it writes, where the (content-keyed) caches
# live, and how it logs
_IGNORED = ("training.output_dir", "teacher_prep.cache_dir", "student_prep.cache_dir",
            "tokenizer.cache_dir", "logging.")  # fmt: skip


def _changed_settings(config: str, settings: list[str], run_dir: str) -> list[str]:
    """``key: saved -> wanted`` for every setting in which the run saved in ``run_dir`` differs
    from the config this study would run there (empty when the folder holds no config yet). The
    saved config is read through today's schema, so a key added since the run, at its default
    (which keeps the earlier behaviour), is not a difference."""
    saved_file = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(saved_file):
        return []
    import yaml

    sys.path.insert(0, ROOT)
    from megatron_eaopd.config import config_to_dict, load_config
    from megatron_eaopd.config.loader import flatten

    try:  # through today's schema: a key added since (at its default) is not a change
        saved = flatten(config_to_dict(load_config(saved_file)))
    except ValueError:  # a key today's schema does not know: compare the saved file as it is
        with open(saved_file, encoding="utf-8") as f:
            saved = flatten(yaml.safe_load(f))
    wanted = flatten(config_to_dict(load_config(os.path.join(ROOT, config), settings)))
    keys = sorted(set(saved) | set(wanted))
    return [
        f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}"
        for k in keys
        if not k.startswith(_IGNORED) and saved.get(k) != wanted.get(k)
    ]


def run_one(args, arm: str, overrides: list[str], seed: int) -> tuple[str, float]:
    """Run (or resume, or skip when finished) one training run; return its folder and seconds.

    The seconds of a finished run are kept in ``<run>/study_seconds`` (summed over resumes)."""
    run_dir = os.path.join(args.out, f"{arm}-s{seed}")
    timing = os.path.join(run_dir, "study_seconds")
    spent = 0.0
    if os.path.exists(timing):
        with open(timing, encoding="utf-8") as f:
            spent = float(f.read().strip() or 0)
    if args.nproc == 1:
        launch = [sys.executable, "-m", "megatron_eaopd.cli"]
        layout = ["parallel.student.tp=1", "parallel.teacher.tp=1"]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={args.nproc}", "-m", "megatron_eaopd.cli"]  # fmt: skip
        layout = []
    settings = [
        *layout, *args.overrides, *overrides, f"training.seed={seed}",
        f"training.output_dir={run_dir}", "logging.progress_bars=false",
        "logging.tensorboard=false",
    ]  # fmt: skip
    changed = _changed_settings(args.config, settings, run_dir)
    if changed:
        raise SystemExit(
            f"{run_dir} holds a run with other settings than this study's: "
            + "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            + ". Use another --out, or remove the folder to run it again."
        )  # fmt: skip
    if os.path.isdir(run_dir) and _finished(run_dir):
        return run_dir, spent
    cmd = [*launch, "--config", args.config, *settings]
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc)))
    t0 = time.perf_counter()
    with open(os.path.join(args.out, f"{arm}-s{seed}.log"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"{run_dir} failed (exit {proc.returncode}); see {args.out}/{arm}-s{seed}.log. "
            "Rerunning the same command resumes the study from here."
        )
    spent += time.perf_counter() - t0
    with open(timing, "w", encoding="utf-8") as f:
        f.write(f"{spent:.1f}\n")
    return run_dir, spent


def summarise(runs: dict) -> dict:
    """Final, start and teacher statistics and the curves, each as (mean, ci95, n)."""
    summary = {"final": {}, "start": {}, "teacher": {}, "curves": {}, "per_seed": {}}
    keys = METRICS + PASS_K
    for objective, dirs in runs.items():
        evals = [_records(os.path.join(d, "metrics.jsonl"), "eval") for d in dirs]
        finals, starts = [e[-1] for e in evals], [e[0] for e in evals]
        summary["final"][objective] = {m: mean_ci([f.get(m) for f in finals]) for m in keys}
        summary["start"][objective] = {m: mean_ci([s.get(m) for s in starts]) for m in keys}
        summary["per_seed"][objective] = {
            m: [(s.get(m), f.get(m)) for s, f in zip(starts, finals)] for m in METRICS
        }
        teacher = [_records(os.path.join(d, "metrics.jsonl"), "teacher") for d in dirs]
        teacher = [t[0] for t in teacher if t]
        if teacher:
            summary["teacher"] = {m: mean_ci([t.get(m) for t in teacher]) for m in keys}
        by_iter: dict[int, list[dict]] = {}
        for rows in evals:
            for row in rows:
                by_iter.setdefault(row["iteration"], []).append(row)
        for m in keys:
            pts = [(i, *mean_ci([r.get(m) for r in rs])[:2]) for i, rs in sorted(by_iter.items())]
            summary["curves"].setdefault(m, {})[objective] = pts
    return summary


def _cell(stat, digits=3) -> str:
    mean, ci, n = stat
    if n == 0:  # e.g. fkl_high where no run had a high-entropy teacher token
        return "-"
    if n == 1:  # one seed: no interval (not a zero-width one)
        return f"{mean:.{digits}f} (1 run, no CI)"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def tables(summary: dict, seeds) -> str:
    """The study's Markdown tables."""
    objectives = list(summary["final"])
    first = objectives[0]
    out = [f"Final evaluation, mean ± 95% CI over seeds {list(seeds)}:", ""]
    out.append("| metric | teacher | student, iteration 0 | " + " | ".join(objectives) + " |")
    out.append("|---|---|---|" + "---|" * len(objectives))
    for m in METRICS:
        teacher = _cell(summary["teacher"][m]) if summary["teacher"].get(m, (0, 0, 0))[2] else "-"
        if m in ("student_high_frac", "teacher_high_frac", "fkl_high", "fkl_all",
                 "student_entropy", "teacher_entropy"):  # fmt: skip
            teacher = "-"  # entropy metrics are taken on the student's samples
        cells = [_cell(summary["final"][o][m]) for o in objectives]
        out.append(f"| {m} | {teacher} | {_cell(summary['start'][first][m])} | "
                   + " | ".join(cells) + " |")  # fmt: skip
    out += ["", "Pass@k of the final evaluation (k = 1..8), mean ± 95% CI:", ""]
    out.append("| k | teacher | student, iteration 0 | " + " | ".join(objectives) + " |")
    out.append("|---|---|---|" + "---|" * len(objectives))
    for k, m in enumerate(PASS_K, 1):
        teacher = _cell(summary["teacher"][m]) if summary["teacher"].get(m, (0, 0, 0))[2] else "-"
        cells = [_cell(summary["final"][o][m]) for o in objectives]
        out.append(f"| {k} | {teacher} | {_cell(summary['start'][first][m])} | "
                   + " | ".join(cells) + " |")  # fmt: skip
    out += ["", "Over training (evaluation samples; mean over seeds): student / teacher "
            "high-entropy fraction, forward KL on the teacher's high-entropy tokens, Avg@8:",
            ""]  # fmt: skip
    out.append("| iteration | " + " | ".join(
        f"{o}: student H>=tau | {o}: teacher H>=tau | {o}: fkl_high | {o}: Avg@8"
        for o in objectives) + " |")  # fmt: skip
    out.append("|---|" + "---|---|---|---|" * len(objectives))
    iters = [p[0] for p in summary["curves"]["mean/avg@8"][first]]
    for n, it in enumerate(iters):
        cells = []
        for o in objectives:
            for m in ("student_high_frac", "teacher_high_frac", "fkl_high", "mean/avg@8"):
                pts = summary["curves"][m][o]
                cells.append(f"{pts[n][1]:.3f}" if n < len(pts) else "-")
        out.append(f"| {it} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(summary: dict, path: str, title: str):
    sys.path.insert(0, ROOT)
    from megatron_eaopd.eval.plot import plot_curves

    curves = {}
    for key in ("mean/avg@8", "mean/pass@8", "fkl_high", "response_length"):
        curves[key] = summary["curves"][key]
    frac = {}
    for o, pts in summary["curves"]["student_high_frac"].items():
        frac[f"{o} student"] = pts
    for o, pts in summary["curves"]["teacher_high_frac"].items():
        frac[f"{o} teacher"] = pts
    curves["H>=tau fraction"] = frac
    passk = {}
    for o in summary["final"]:
        passk[o] = [(k, *summary["final"][o][m][:2]) for k, m in enumerate(PASS_K, 1)]
    first = next(iter(summary["start"]))
    passk["iteration 0"] = [(k, *summary["start"][first][m][:2]) for k, m in enumerate(PASS_K, 1)]
    if summary["teacher"]:
        passk["teacher"] = [(k, *summary["teacher"][m][:2]) for k, m in enumerate(PASS_K, 1)]
    out1 = plot_curves(curves, path, title=title, force=True)
    root, ext = os.path.splitext(path)
    out2 = plot_curves({"pass@k (final)": passk}, f"{root}_passk{ext}", title=title,
                       xlabel="k", force=True)  # fmt: skip
    return out1, out2


def ablation_table(summary: dict, arms: dict, seconds: dict, seeds) -> str:
    """One row per arm: final Avg@8 / Pass@8 with 95% CIs, the change from iteration 0, forward KL
    on the teacher's high-entropy tokens, the high-entropy fractions and the mean run time."""
    out = [f"Final evaluation per arm, mean ± 95% CI over seeds {list(seeds)}:", ""]
    out.append("| arm | overrides | Avg@8 | Pass@8 | Avg@8 change from iteration 0 | fkl_high "
               "| student H>=tau (teacher) | response length | s per run |")  # fmt: skip
    out.append("|---|---|---|---|---|---|---|---|---|")
    for arm, overrides in arms.items():
        final = summary["final"][arm]
        gains = [f - s for s, f in summary["per_seed"][arm]["mean/avg@8"]]
        run_s = [t for t in seconds[arm] if t]
        out.append(
            f"| {arm} | `{' '.join(overrides)}` | {_cell(final['mean/avg@8'])} | "
            f"{_cell(final['mean/pass@8'])} | {_cell(mean_ci(gains))} | "
            f"{_cell(final['fkl_high'])} | {final['student_high_frac'][0]:.3f} "
            f"({final['teacher_high_frac'][0]:.3f}) | {final['response_length'][0]:.1f} | "
            f"{f'{statistics.mean(run_s):.0f}' if run_s else '-'} |"
        )
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--objectives", nargs="+", default=None,
                   help="arms that differ only in loss.objective (default: opd eopd)")  # fmt: skip
    p.add_argument("--arm", action="append", default=[], metavar='"NAME OVERRIDE ..."',
                   help="an arm and its overrides in one quoted string (repeatable)")  # fmt: skip
    p.add_argument("--preset", choices=("ablation",), default=None,
                   help="ablation: the arms of ablation_arms()")  # fmt: skip
    p.add_argument(
        "--name",
        default=None,
        help="stem of the written tables and summary (default: study, or the preset)",
    )
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="trainings run at the same time")
    p.add_argument("--plot", default=None, help="PNG path for the curves")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = p.parse_args()
    if args.jobs < 1 or args.nproc < 1:
        p.error("--jobs and --nproc must be >= 1")
    arms: dict[str, list[str]] = {}
    if args.preset == "ablation":
        arms.update(ablation_arms())
    for name in args.objectives or ([] if (args.preset or args.arm) else ["opd", "eopd"]):
        arms[name] = [f"loss.objective={name}"]
    sys.path.insert(0, ROOT)
    from megatron_eaopd.config.schema import OBJECTIVES

    for name in args.objectives or []:
        if name not in OBJECTIVES:
            p.error(f"--objectives: {name!r} is not one of {OBJECTIVES} (dotted overrides go "
                    "before the options or after --)")  # fmt: skip
    for spec in args.arm:
        if not spec.split():
            p.error('--arm: an empty arm (give "NAME OVERRIDE ...")')
        name, *overrides = spec.split()
        if name in arms and arms[name] != overrides:
            p.error(f"--arm: {name!r} is given twice with different overrides (they would share "
                    "run folders)")  # fmt: skip
        arms[name] = overrides
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: a seed is given twice {args.seeds} (it would train one folder twice)")
    bad = [a for a in arms if not a or "/" in a or a.startswith(".") or "=" in a]
    bad += [o for ovs in arms.values() for o in ovs if "=" not in o]
    bad += [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"not an arm name or a key=value override: {bad}")
    stem = args.name or args.preset or "study"
    os.makedirs(args.out, exist_ok=True)
    jobs = [(a, s) for s in args.seeds for a in arms]  # seeds outer: early complete pairs
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="runs", dynamic_ncols=True)
    except ImportError:
        bar = None
    t0 = time.perf_counter()
    done: dict[tuple[str, int], tuple[str, float]] = {}

    def one(job):
        arm, seed = job
        if bar is not None:
            bar.set_postfix_str(f"{arm} seed {seed}")
        run_dir, seconds = run_one(args, arm, arms[arm], seed)
        done[job] = (run_dir, seconds)
        (bar.write if bar is not None else print)(f"{run_dir}: {seconds:.0f} s")
        if bar is not None:
            bar.update(1)

    one(jobs[0])  # alone: it prepares the tokenizer, teacher and student caches the others share
    if args.jobs == 1:
        for job in jobs[1:]:
            one(job)
    else:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        pool = ThreadPoolExecutor(max_workers=args.jobs)
        try:
            futures = [pool.submit(one, job) for job in jobs[1:]]
            for future in as_completed(futures):
                if future.exception() is not None:  # stop at the first failure, keep its message
                    raise future.exception()
        finally:  # a failure or an interrupt (Ctrl-C) starts no further run; running ones finish
            pool.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
        bar.close()
    runs = {a: [done[(a, s)][0] for s in args.seeds] for a in arms}
    seconds = {a: [done[(a, s)][1] for s in args.seeds] for a in arms}
    summary = summarise(runs)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["arms"] = arms
    summary["run_seconds"] = seconds
    with open(os.path.join(args.out, f"{stem}-summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    text = ablation_table(summary, arms, seconds, args.seeds) + "\n\n" + tables(summary, args.seeds)
    with open(os.path.join(args.out, f"{stem}-tables.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    print(f"wall time of this invocation: {summary['wall_seconds']:.0f} s "
          f"(sum over runs: {sum(t for ts in seconds.values() for t in ts):.0f} s)")  # fmt: skip
    if args.plot:
        title = f"{', '.join(arms)}: {len(args.seeds)} seeds, mean and 95% CI"
        for out in plot(summary, args.plot, title):
            print(f"plot: {out}")


if __name__ == "__main__":
    main()
