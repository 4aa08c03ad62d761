"""The OPD vs EOPD study script (benchmarks/opd_vs_eopd.py) and the JSONL task it runs on
(benchmarks/make_remainder_task.py), without training: every ablation arm is a config the trainer
accepts with the intended values, the study skips finished runs, resumes and stops on a failed one,
its statistics equal an independent computation, and the JSONL task's files are valid, disjoint and
judged right by the package's JSONL path."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys

import pytest

from megatron_eaopd.config import check_run, load_config, save_resolved
from megatron_eaopd.data import prepare_data
from megatron_eaopd.data.jsonl import JsonlTask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny-cpu.yaml")


def _module(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _module("opd_vs_eopd")
remainder = _module("make_remainder_task")


def test_every_ablation_arm_is_a_valid_config_with_its_values(tmp_path):
    arms = study.ablation_arms()
    assert len(arms) == 13 and len(set(map(tuple, arms.values()))) == 13
    # the built-in task's real tokenizer bounds top-k (k = 64 was refused an hour into a study)
    cfg = load_config(TINY, [f"tokenizer.cache_dir={tmp_path}"])
    vocab = prepare_data(cfg).tokenizer.vocab_size
    assert study.FULL_VOCAB_K == vocab
    for name, overrides in arms.items():
        cfg = load_config(TINY, ["parallel.student.tp=1", "parallel.teacher.tp=1", *overrides])
        check_run(cfg, world_size=1, vocab_size=vocab)
        sampled = name.startswith("sampled-")
        assert cfg.loss.form == ("sampled" if sampled else "exact"), name
        assert cfg.eval.entropy_threshold == 0.8, name  # fractions comparable across arms
        objective = name.removeprefix("sampled-").split("-")[0]
        assert cfg.loss.objective == objective, name
        assert cfg.loss.entropy_threshold == {"eopd-tau0.4": 0.4, "eopd-tau1.2": 1.2}.get(name, 0.8)
        assert cfg.loss.top_k == {"sampled-eopd-k4": 4, "sampled-eopd-k36": vocab}.get(name, 16)
        assert cfg.loss.tail_bucket == (name == "sampled-eopd-tail")
        if sampled:
            assert cfg.optimizer.lr < load_config(TINY).optimizer.lr


def _fake_run(run_dir, seed, settings, iterations=4, gain=0.1, finished=True):
    """The files a finished training run leaves: metrics rows, the resolved config of
    ``settings`` (the dotted overrides on the tiny config, as the trainer saves it), checkpoints."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    rows = [{"split": "teacher", "iteration": 0, "mean/avg@8": 0.9, "mean/pass@8": 1.0}]
    last = iterations if finished else iterations // 2
    for it in range(0, last + 1, 2):
        value = 0.3 + gain * seed * it / iterations
        rows.append({"split": "eval", "iteration": it, "mean/avg@8": value,
                     "mean/pass@8": min(1.0, 2 * value), "fkl_high": 1.0 - value,
                     "student_high_frac": 0.1, "teacher_high_frac": 0.12,
                     "response_length": 30.0 + it})  # fmt: skip
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = load_config(TINY, settings)
    assert cfg.training.iterations == iterations
    save_resolved(cfg, os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w", encoding="utf-8") as f:
        f.write(f"iter_{last:07d}\n")


def _settings(cmd):
    """The dotted overrides of a trainer command line (what follows ``--config FILE``)."""
    return cmd[cmd.index("--config") + 2 :]


def _fake_trainer(launched):
    def fake_run(cmd, cwd, stdout, stderr, env):
        run_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("training.output_dir="))
        seed = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("training.seed=")))
        launched.append((os.path.basename(run_dir), cmd))
        gain = 0.2 if "loss.objective=eopd" in cmd else 0.1
        _fake_run(run_dir, seed, _settings(cmd), gain=gain)
        return type("Done", (), {"returncode": 0})()

    return fake_run


STUDY = ["task.synthetic.seed=5", "training.iterations=4"]


def _as_study(out, arm, seed):
    """The overrides the study passes for ``arm`` at ``seed`` with --nproc 1 and STUDY."""
    return ["parallel.student.tp=1", "parallel.teacher.tp=1", *STUDY, f"loss.objective={arm}",
            f"training.seed={seed}", f"training.output_dir={out}/{arm}-s{seed}",
            "logging.progress_bars=false", "logging.tensorboard=false"]  # fmt: skip


def test_study_skips_finished_runs_resumes_others_and_tabulates(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "study")
    _fake_run(f"{out}/opd-s1", 1, _as_study(out, "opd", 1))  # finished: must not run again
    # interrupted: must run (resume)
    _fake_run(f"{out}/opd-s2", 2, _as_study(out, "opd", 2), finished=False)
    launched = []
    fake_run = _fake_trainer(launched)

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    argv = ["opd_vs_eopd.py", "--out", out, "--seeds", "1", "2", "3", "--nproc", "1",
            "--jobs", "2", "--arm", "eopd loss.objective=eopd", "--objectives", "opd",
            "--", *STUDY]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    names = sorted(n for n, _ in launched)
    assert names == ["eopd-s1", "eopd-s2", "eopd-s3", "opd-s2", "opd-s3"]
    for _, cmd in launched:  # the layout first, then the study's overrides, then the arm's
        assert cmd.index("parallel.student.tp=1") < cmd.index("task.synthetic.seed=5")
        arm = next(a for a in cmd if a.startswith("loss.objective="))
        assert cmd.index("task.synthetic.seed=5") < cmd.index(arm)
    summary = json.load(open(f"{out}/study-summary.json", encoding="utf-8"))
    finals = [0.3 + g * s for g, s in ((0.2, 1), (0.2, 2), (0.2, 3))]
    mean, ci, n = summary["final"]["eopd"]["mean/avg@8"]
    assert n == 3 and math.isclose(mean, statistics.mean(finals))
    # 95% CI half-width with Student's t at 2 degrees of freedom (4.303)
    assert math.isclose(ci, 4.303 * statistics.stdev(finals) / math.sqrt(3))
    text = open(f"{out}/study-tables.md", encoding="utf-8").read()
    assert "| eopd | `loss.objective=eopd` |" in text and "| opd |" in text

    # a rerun launches nothing; a failing run (here in the --jobs 2 pool) stops the study with
    # a message naming its log
    launched.clear()
    study.main()
    assert launched == []
    _fake_run(f"{out}/opd-s3", 3, _as_study(out, "opd", 3), finished=False)
    monkeypatch.setattr(study.subprocess, "run",
                        lambda *a, **k: type("Failed", (), {"returncode": 1})())  # fmt: skip
    with pytest.raises(SystemExit, match=r"opd-s3 failed \(exit 1\).*opd-s3.log"):
        study.main()


def test_remainder_task_files_are_valid_disjoint_and_judged_by_the_jsonl_path(tmp_path):
    train, distill, heldout = remainder.build(seed=3, num_train=300, num_distill=100,
                                              num_eval=40, solutions=8)  # fmt: skip
    keys = [
        {(r["n"], r["d"], tuple(r["multipliers"])) for r in s} for s in (train, distill, heldout)
    ]
    assert [len(k) for k in keys] == [300, 100, 40]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    for name, rows in zip(("train", "distill", "heldout"), (train, distill, heldout)):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    task = JsonlTask(tmp_path / "distill.jsonl", tmp_path / "train.jsonl",
                     [tmp_path / "heldout.jsonl"])  # fmt: skip
    multi = 0
    for problem in task.train_problems():
        n, d, mults = problem.meta["n"], problem.meta["d"], problem.meta["multipliers"]
        assert int(problem.answer) == n % d and len(set(problem.solutions)) == len(
            problem.solutions
        )
        multi += len(problem.solutions) > 1
        for solution in problem.solutions:
            assert task.check(solution, problem)
            left = n  # replay every step: an allowed multiple that fits, down to below d
            steps = solution.split("\\boxed")[0].rstrip(";").split(";")
            for step in steps:
                m, rest = step[1:].split("*")
                dd, after = rest.split("=")
                assert int(dd) == d and int(m) in mults and int(m) * d <= left
                left -= int(m) * d
                assert int(after) == left
            assert left < d
        wrong = (int(problem.answer) + 1) % d
        assert not task.check(f"-1*{d}={n - d};\\boxed{{{wrong}}}", problem)
    assert multi > 0.9 * len(train)  # many valid solutions per problem
    assert list(task.eval_sets()) == ["heldout"] and len(task.distill_problems()) == 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objectives", "opd", "task.synthetic.seed=5"], "is not one of"),
        (["--arm", "k4 loss.top_k"], "not an arm name or a key=value override"),
        (["--arm", "a/b loss.top_k=4"], "not an arm name"),
        (["--jobs", "0"], "--jobs and --nproc must be >= 1"),
        (["--arm", " "], "an empty arm"),
        (["--seeds", "1", "2", "1"], "a seed is given twice"),
        (["--objectives", "opd", "--arm", "opd loss.top_k=4"], "given twice with different"),
    ],
)
def test_study_refuses_bad_arguments_before_running(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: pytest.fail("ran a training"))
    monkeypatch.setattr(sys, "argv", ["opd_vs_eopd.py", "--out", str(tmp_path), *args])
    with pytest.raises(SystemExit) as exc:
        study.main()
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_interrupted_study_with_jobs_starts_no_further_run(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt in the main thread) while --jobs runs trainings: the queued runs
    must not start afterwards (the pool used to run every remaining one before exiting)."""
    import concurrent.futures
    import threading
    import time

    launched, lock = [], threading.Lock()

    def fake_run(cmd, cwd, stdout, stderr, env):
        run_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("training.output_dir="))
        with lock:
            launched.append(os.path.basename(run_dir))
        time.sleep(0.3)
        _fake_run(run_dir, 1, _settings(cmd), iterations=load_config(TINY).training.iterations)
        return type("Done", (), {"returncode": 0})()

    def interrupted(futures):
        raise KeyboardInterrupt
        yield  # a generator, as the real one

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    monkeypatch.setattr(concurrent.futures, "as_completed", interrupted)
    argv = ["opd_vs_eopd.py", "--out", str(tmp_path), "--seeds", "1", "2", "3", "4",
            "--nproc", "1", "--jobs", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        study.main()
    time.sleep(0.5)  # anything still queued would have started by now
    # the first run alone, then at most the two the workers had taken: not the other five
    assert 1 <= len(launched) <= 3, launched


@pytest.mark.parametrize(
    "args",
    [["--num-train", "-5"], ["--num-eval", "0"], ["--solutions", "0"], ["--num-distill", "0"]],
)
def test_remainder_task_refuses_empty_or_negative_sizes(tmp_path, monkeypatch, capsys, args):
    out = tmp_path / "task"
    monkeypatch.setattr(sys, "argv", ["make_remainder_task.py", "--out", str(out), *args])
    with pytest.raises(SystemExit) as exc:
        remainder.main()
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_remainder_task_refuses_more_problems_than_exist():
    total = len(remainder.all_problems())
    # independent count: d in 3..8, N from 3d to min(72, 9d - 1), 14 multiplier sets (4 + 6 + 4)
    assert total == 14 * sum(min(72, 9 * d - 1) - 3 * d + 1 for d in range(3, 9))
    with pytest.raises(SystemExit, match=f"only {total}"):
        remainder.build(0, total - 1, 1, 1, 1)
    assert sum(map(len, remainder.build(0, total - 2, 1, 1, 1))) == total


def test_study_refuses_a_folder_that_holds_a_run_with_other_settings(tmp_path, monkeypatch):
    """Rerunning into the same --out with changed settings must not report the old runs as
    this study's (finished) or resume them under the new settings (unfinished)."""
    out = str(tmp_path)
    _fake_run(f"{out}/opd-s1", 1, _as_study(out, "opd", 1))
    _fake_run(f"{out}/eopd-s1", 1, [*_as_study(out, "eopd", 1)], finished=False)
    launched = []
    monkeypatch.setattr(study.subprocess, "run", _fake_trainer(launched))
    base = ["opd_vs_eopd.py", "--out", out, "--seeds", "1", "--nproc", "1", "--"]
    lr = load_config(TINY).optimizer.lr  # the config's; the study changes it to half
    for changed, message in [
        ([*STUDY, f"optimizer.lr={lr / 2!r}"], f"optimizer.lr: {lr!r} -> {lr / 2!r}"),
        (["task.synthetic.seed=5", "training.iterations=8"], "training.iterations: 4 -> 8"),
    ]:
        monkeypatch.setattr(sys, "argv", [*base, *changed])
        with pytest.raises(SystemExit, match=rf"opd-s1 holds a run with other settings.*{message}"):
            study.main()
    assert launched == []
    # a run saved before a key existed (here: without rollout.cuda_graphs), the key at its
    # default now: the same settings; at another value: a change
    saved = f"{out}/opd-s1/config.yaml"
    with open(saved, encoding="utf-8") as f:
        text = f.read()
    assert "  cuda_graphs: false\n" in text
    with open(saved, "w", encoding="utf-8") as f:
        f.write(text.replace("  cuda_graphs: false\n", ""))
    monkeypatch.setattr(sys, "argv", [*base, *STUDY, "rollout.cuda_graphs=true"])
    with pytest.raises(SystemExit, match=r"rollout.cuda_graphs: False -> True"):
        study.main()
    # where the data lives and how it logs are not settings of the run: accepted
    monkeypatch.setattr(sys, "argv", [*base, *STUDY, f"tokenizer.cache_dir={out}/tok"])
    study.main()
    assert [name for name, _ in launched] == ["eopd-s1"]


def test_cells_give_a_ci_only_from_two_runs():
    """One seed has no interval: the table says so instead of '± 0.000'."""
    one = study._cell(study.mean_ci([0.25]))
    assert one == "0.250 (1 run, no CI)" and "±" not in one
    two = study._cell(study.mean_ci([0.2, 0.4]))
    half = study.t95(1) * statistics.stdev([0.2, 0.4]) / math.sqrt(2)
    assert two == f"0.300 ± {half:.3f}"
    assert study._cell(study.mean_ci([None, float("nan")])) == "-"
