"""The trainer end to end at TP=2 over gloo: teacher preparation (then its cache), distillation,
evaluation, metrics, checkpoints, and a preempted run that resumes exactly where it stopped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.dist import run_distributed
from tests.trainer.common import StopAfter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu-tp2.yaml")

# A small version of the tiny CPU config: 4 iterations of 8 prompts x 2 samples, 2 optimizer
# steps per iteration, a briefly trained teacher, short responses.
SMALL = [
    "training.iterations=4",
    "training.eval_interval=2",
    "training.checkpoint_interval=2",
    "rollout.prompts_per_iteration=8",
    "rollout.mini_batch_size=4",
    "rollout.micro_batch_size=4",
    "rollout.max_response_tokens=40",
    "eval.max_prompts=4",
    "eval.k=2",
    "eval.max_response_tokens=40",
    "teacher_prep.iterations=15",
    "teacher_prep.batch_size=16",
    "student_prep.iterations=5",
    "student_prep.batch_size=8",
    "optimizer.lr_schedule=cosine",  # the test checks the decay (tiny-cpu's lr is constant)
    "task.synthetic.num_train=200",
    "task.synthetic.num_distill=64",
    "task.synthetic.num_eval=8",
    "logging.progress_bars=false",
    "logging.console=false",
]


def _cfg(tmp, name, objective="eopd", *extra):
    from megatron_eaopd.config import load_config

    return load_config(
        CONFIG,
        SMALL
        + [
            f"training.output_dir={tmp}/{name}",
            f"teacher_prep.cache_dir={tmp}/teachers",
            f"student_prep.cache_dir={tmp}/students",
            f"tokenizer.cache_dir={tmp}/tokenizers",
            f"loss.objective={objective}",
            *extra,
        ],
    )


def _dead_attempt(folder, iteration, config=None):
    """Records of an attempt killed after ``iteration`` (metrics and samples; its config.yaml)."""
    os.makedirs(f"{folder}/eval_samples", exist_ok=True)
    with open(f"{folder}/metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"split": "eval", "iteration": iteration, "dead": True}) + "\n")
    with open(f"{folder}/eval_samples/student_iter_{iteration:07d}.jsonl", "w") as f:
        f.write("dead\n")
    if config is not None:
        from megatron_eaopd.config import save_resolved

        save_resolved(config, f"{folder}/config.yaml")


def _worker(rank, world, tmp):
    from megatron_eaopd.cli import run

    if rank == 0:  # an attempt with the same settings that died before its first checkpoint
        _dead_attempt(f"{tmp}/full", 1, _cfg(tmp, "full"))
    full = run(_cfg(tmp, "full"))
    keep = "training.keep_checkpoints=1"  # the resumed run keeps its newest save only
    first = run(_cfg(tmp, "resumed", "eopd", keep), preemption=StopAfter(2))
    if rank == 0:  # as if the stopped run had gone on past its checkpoint (2) and died
        _dead_attempt(f"{tmp}/resumed", 3)
    # an empty student cache: the resumed run loads its checkpoint, no warm start is prepared
    second = run(_cfg(tmp, "resumed", "eopd", keep, f"student_prep.cache_dir={tmp}/no-students"))
    return {"full": full, "first": first, "second": second}


def _records(path, split):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["split"] == split]


def _strip_times(row):
    return {k: v for k, v in row.items()
            if not k.startswith(("time_", "memory_")) and k != "tokens_per_s"}  # fmt: skip


def test_train_end_to_end_and_resume(tmp_path):
    tmp = str(tmp_path)
    results = run_distributed(_worker, 2, tmp, timeout=600)
    r = results[0]
    assert r["full"]["iteration"] == 4 and not r["full"]["stopped_early"]
    assert r["first"]["iteration"] == 2 and r["first"]["stopped_early"]
    assert r["second"]["iteration"] == 4 and not r["second"]["stopped_early"]

    # one teacher and one student warm start prepared, then reused from the caches
    assert len([n for n in os.listdir(f"{tmp}/teachers") if not n.endswith(".lock")]) == 1
    assert len([n for n in os.listdir(f"{tmp}/students") if not n.endswith(".lock")]) == 1

    full_dir, res_dir = f"{tmp}/full", f"{tmp}/resumed"
    from megatron_eaopd.config import load_config

    assert load_config(f"{full_dir}/config.yaml") == _cfg(tmp, "full")
    with open(f"{full_dir}/checkpoints/latest") as f:
        assert f.read().strip() == "iter_0000004"
    assert sorted(d for d in os.listdir(f"{full_dir}/checkpoints") if d.startswith("iter_")) == [
        "iter_0000002",
        "iter_0000004",
    ]
    # each save records its run folder (a second run folder cannot take its checkpoints over)
    from megatron_eaopd.models.checkpoint import read_meta

    meta = read_meta(f"{full_dir}/checkpoints/iter_0000004")
    assert meta["extra"]["output_dir"] == os.path.abspath(full_dir)

    train = _records(f"{full_dir}/metrics.jsonl", "train")
    assert [row["iteration"] for row in train] == [1, 2, 3, 4]
    for row in train:
        for key in (
            "loss",
            "pg_loss",
            "fkl",
            "fkl_gated",
            "gate",
            "teacher_entropy",
            "student_entropy",
            "student_topk_mass",
            "response_length",
            "reward",
            "tokens_per_s",
            "time_rollout",
            "time_teacher",
            "time_update",
            "grad_norm",
            "memory_rollout_gib",
            "memory_update_gib",
        ):
            assert key in row and row[key] is not None and math.isfinite(row[key]), key
        assert 0 <= row["gate"] <= 1 and 0 <= row["reward"] <= 1
        assert 1 <= row["response_length"] <= 40
        assert row["skipped_updates"] == 0
    # the student changes: the losses of the iterations differ, the learning rate decays
    assert len({row["loss"] for row in train}) == 4
    assert train[-1]["lr"] < train[1]["lr"]
    evals = _records(f"{full_dir}/metrics.jsonl", "eval")
    assert [row["iteration"] for row in evals] == [0, 2, 4]
    for row in evals:
        assert 0 <= row["mean/avg@2"] <= row["mean/pass@2"] <= 1
        assert 0 <= row["student_high_frac"] <= 1
        # fkl_high is a mean over the teacher's high-entropy tokens: null without any
        assert (row["fkl_high"] is None) == (row["teacher_high_frac"] == 0)
        assert row["fkl_high"] is None or row["fkl_high"] >= 0
    assert [row["iteration"] for row in _records(f"{full_dir}/metrics.jsonl", "teacher")] == [0]

    # the dead attempts' records were moved aside, not mixed into the runs' (not deleted)
    for folder, iteration, why in ((full_dir, 1, "no-checkpoint"), (res_dir, 3, "after-iter")):
        name = f"student_iter_{iteration:07d}.jsonl"
        assert name not in os.listdir(f"{folder}/eval_samples")
        (aside,) = os.listdir(f"{folder}/earlier_attempts")
        assert why in aside
        with open(f"{folder}/earlier_attempts/{aside}/eval_samples/{name}") as f:
            assert f.read() == "dead\n"
        assert _records(f"{folder}/earlier_attempts/{aside}/metrics.jsonl", "eval") == [
            {"split": "eval", "iteration": iteration, "dead": True}
        ]
    assert not any(r.get("dead") for r in _records(f"{full_dir}/metrics.jsonl", "eval"))
    # training.keep_checkpoints=1: the save of iteration 4 replaced that of iteration 2
    assert sorted(os.listdir(f"{tmp}/resumed/checkpoints")) == ["iter_0000004", "latest"]
    assert not os.listdir(f"{tmp}/no-students") if os.path.isdir(f"{tmp}/no-students") else True
    # the preempted run saved iteration 2 and the resumed run repeated iterations 3 and 4 exactly
    resumed = _records(f"{res_dir}/metrics.jsonl", "train")
    assert [row["iteration"] for row in resumed] == [1, 2, 3, 4]
    for a, b in zip(train, resumed):
        assert _strip_times(a) == _strip_times(b)
    # iteration 2 was due for evaluation when the stop came: the resumed run evaluates it first
    res_evals = _records(f"{res_dir}/metrics.jsonl", "eval")
    assert [row["iteration"] for row in res_evals] == [0, 2, 4]
    for a, b in zip(res_evals, evals):
        assert _strip_times(a) == _strip_times(b)


def test_cli_rejects_bad_config_before_any_compute(tmp_path, capsys, monkeypatch):
    from megatron_eaopd.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for the config's TP 2
    assert main(["--config", CONFIG, "loss.entropy_treshold=1.0"]) == 2
    assert "did you mean 'entropy_threshold'" in capsys.readouterr().err
    over = [f"tokenizer.cache_dir={tmp_path}/tok", "rollout.max_prompt_tokens=5"]
    assert main(["--config", CONFIG, *over]) == 2
    assert "max_prompt_tokens=5" in capsys.readouterr().err
    vpp = ["parallel.student.pp=2", "parallel.student.vpp=2", "model.student.layers=4"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # TP 2 x PP 2
    assert main(["--config", CONFIG, *vpp]) == 2
    assert "parallel.student.vpp must be null" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--config", CONFIG, "loss.objective=eopd_exact", "parallel.teacher.tp=1"]) == 2
    assert "parallel.teacher.tp=2" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_cpu_config_with_torchrun(tmp_path):
    """The shipped default, launched as users launch it (a few minutes on 2 cores)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "megatron_eaopd.cli", "--config", CONFIG, f"training.output_dir={tmp_path}/run",
        "logging.progress_bars=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = _records(f"{tmp_path}/run/metrics.jsonl", "eval")
    assert [row["iteration"] for row in evals] == [0, 10, 20, 30]
    teacher = _records(f"{tmp_path}/run/metrics.jsonl", "teacher")[0]
    assert teacher["mean/pass@8"] > 0.3, "the prepared teacher should often solve the task"
    train = _records(f"{tmp_path}/run/metrics.jsonl", "train")
    assert [row["iteration"] for row in train] == list(range(1, 31))


def test_cli_turns_a_refused_resume_into_exit_2(tmp_path, capsys, monkeypatch):
    """A resume refused during the trainer's setup (the saved run's prompt file edited in place)
    ended in a traceback per rank and exit 1: now the message once and exit 2, as for any
    configuration error, with config_error in the launcher's status file."""
    import megatron_eaopd.cli as cli
    from megatron_eaopd.trainer.run_dir import RunRefused

    def refuse(cfg, handler, data):
        raise RunRefused("training.output_dir=x holds a run trained on other inputs")

    monkeypatch.setattr(cli, "run", refuse)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("EAOPD_STATUS_DIR", str(tmp_path / "status"))
    over = [f"tokenizer.cache_dir={tmp_path}/tok", f"training.output_dir={tmp_path}/run"]
    assert cli.main(["--config", CONFIG, *over]) == 2
    err = capsys.readouterr().err
    assert "eaopd-train: training.output_dir=x holds a run trained on other inputs" in err
    assert "Traceback" not in err
    assert (tmp_path / "status" / "rank0").read_text().split() == ["config_error", "2"]


@pytest.mark.parametrize(
    "rank, local_rank, shown", [(0, None, True), (1, "1", False), (2, "0", True), (3, "1", False)]
)
def test_cli_prints_a_config_error_once_per_node(
    tmp_path, capsys, monkeypatch, rank, local_rank, shown
):
    """An unknown key on 8 GPUs printed the same message 8 times, interleaved: now each node's
    local rank 0 prints it (rank 2 is the second node's first rank) and every rank records it."""
    import megatron_eaopd.cli as cli

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(rank))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("EAOPD_STATUS_DIR", str(tmp_path / "status"))
    over = [f"tokenizer.cache_dir={tmp_path}/tok", f"training.output_dir={tmp_path}/run",
            "no_such.key=1"]  # fmt: skip
    assert cli.main(["--config", CONFIG, *over]) == 2
    err = capsys.readouterr().err
    assert ("no_such" in err) == shown and err.count("eaopd-train:") == int(shown)
    status = tmp_path / "status" / f"rank{rank}"
    assert status.read_text().split() == ["config_error", "2"]


def test_cli_prints_a_refusal_of_the_ranks_own_gpu_on_that_rank(tmp_path, capsys, monkeypatch):
    """LOCAL_RANK 9 on an 8-GPU node is refused on that rank alone, which must say so (local
    rank 0 passes the check and prints nothing)."""
    import torch

    import megatron_eaopd.cli as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    for key, value in (("WORLD_SIZE", "16"), ("RANK", "9"), ("LOCAL_RANK", "9")):
        monkeypatch.setenv(key, value)
    over = [f"tokenizer.cache_dir={tmp_path}/tok", f"training.output_dir={tmp_path}/run"]
    assert cli.main(["--config", CONFIG, *over]) == 2
    assert "LOCAL_RANK: 9, but this node shows 8 GPUs" in capsys.readouterr().err


def _diverge_worker(rank, world, tmp):
    """A run whose learning rate blows the student up, with training.max_skipped_in_a_row=2:
    the message each rank raised (None: the run went to its end)."""
    from megatron_eaopd.cli import run
    from megatron_eaopd.trainer.update import NonFiniteUpdateError

    cfg = _cfg(tmp, "diverged", "eopd", "optimizer.lr=1e6", "optimizer.clip_grad=0",
               "optimizer.warmup_iterations=0", "training.eval_at_start=false",
               "training.iterations=6", "training.eval_interval=0", "student_prep.iterations=1",
               "teacher_prep.iterations=2", "training.max_skipped_in_a_row=2")  # fmt: skip
    try:
        run(cfg)
    except NonFiniteUpdateError as err:
        return str(err)
    return None


def test_training_max_skipped_in_a_row_stops_a_diverged_run(tmp_path):
    """The key reaches the trainer's student: every later update of a diverged run was skipped
    to the end, and the run reported success."""
    results = run_distributed(_diverge_worker, 2, str(tmp_path), timeout=600)
    for text in results:
        assert text is not None and text.startswith("the last 2 updates were all skipped")


@pytest.mark.parametrize(
    "rank, error, shown",
    [
        (0, "everywhere", "eaopd-train: checkpoint not saved: cannot save iter_0000006"),
        (1, "everywhere", None),  # rank 0 says it
        (1, "here", "eaopd-train: checkpoint not saved: saving iter_0000006 to"),
        (1, "peer", "eaopd-train: rank 1 stopped: another rank ended during a collective"),
    ],
)
def test_cli_turns_a_failed_save_into_one_line(tmp_path, capsys, monkeypatch, rank, error, shown):
    """A full disk at a save printed four tracebacks (torch's zip writer, CheckpointException,
    gloo's 'Connection closed by peer') and never the disk: now one line and exit 1, once for
    a verdict every rank reached, on its own rank for a write that failed there, and a one-line
    note on the ranks whose peer died."""
    import megatron_eaopd.cli as cli
    from megatron_eaopd.models.save_errors import CheckpointSaveError

    def fail(cfg, handler, data):
        if error == "peer":
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [x]:1")
        text = "cannot save iter_0000006" if error == "everywhere" else "saving iter_0000006 to"
        raise CheckpointSaveError(text + " ...", everywhere=error == "everywhere")

    monkeypatch.setattr(cli, "run", fail)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("EAOPD_STATUS_DIR", str(tmp_path / "status"))
    over = [f"tokenizer.cache_dir={tmp_path}/tok", f"training.output_dir={tmp_path}/run"]
    assert cli.main(["--config", CONFIG, *over]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("eaopd-train")]
    assert lines == ([] if shown is None else [lines[0]]) and (
        shown is None or lines[0].startswith(shown)
    )
    assert (tmp_path / "status" / f"rank{rank}").read_text().split() == ["failed", "1"]


def test_cli_keeps_the_traceback_of_other_runtime_errors(tmp_path, monkeypatch):
    import megatron_eaopd.cli as cli

    def fail(cfg, handler, data):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run", fail)
    monkeypatch.setenv("WORLD_SIZE", "2")
    over = [f"tokenizer.cache_dir={tmp_path}/tok", f"training.output_dir={tmp_path}/run"]
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["--config", CONFIG, *over])


def test_a_signal_during_the_data_preparation_stops_the_run(tmp_path, monkeypatch):
    """run_local.sh starts the workers with the preemption signals ignored; the handler was
    installed only after the checks and the data preparation, so a signal sent then was lost
    and the run went to its end. Now the run receives it (and stops at its first chance)."""
    import signal

    import megatron_eaopd.cli as cli
    import megatron_eaopd.data as data_mod

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as run_local.sh starts workers
    real, seen = data_mod.prepare_data, {}

    def preparing(cfg):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(cfg)

    def run(cfg, handler, data):
        seen["stop"] = handler.reason
        return {"stopped_early": True, "iteration": 0, "total_iterations": 1}

    monkeypatch.setattr(data_mod, "prepare_data", preparing)
    monkeypatch.setattr(cli, "run", run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("EAOPD_PREEMPT_SIGNALS", "SIGUSR1")
    over = [
        f"tokenizer.cache_dir={tmp_path}/tok",
        f"training.output_dir={tmp_path}/run",
        f"teacher_prep.cache_dir={tmp_path}/t",
        f"student_prep.cache_dir={tmp_path}/s",
    ]
    try:
        assert cli.main(["--config", CONFIG, *over]) == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen["stop"] == "SIGUSR1"
