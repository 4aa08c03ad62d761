"""The plugin face: examples/eopd_megatron.py (a megatron-core-only training script) trains with
EOPD at TP 2 over gloo, offline (teacher-forced, forward KL on the teacher's top-k) and on-policy
(the student's own rollouts, the paper's objective, a teacher at another layout); the --eopd-*
flags map onto the config schema and bad values are refused with the config key named."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from tests.trainer.test_paper_path import write_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "eopd_megatron.py")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("teacher"))
    write_model(folder, vocab=200, layers=2, hidden=64, tied=False, seed=3)
    return folder


def _run(teacher, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           EXAMPLE, "--teacher", teacher, "--tp", "2", *flags]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", EAOPD_COMPILE="0")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == list(range(len(rows))) and rows
    return rows


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_offline_distillation_in_a_megatron_core_script(teacher_dir):
    """Full-vocabulary EOPD on teacher-forced data: the teacher's logits shard at the student's
    TP 2 (attach_logits), exact reverse KL plus the gated exact forward KL."""
    rows = _run(teacher_dir, "--mode", "offline", "--steps", "12", "--eopd-objective",
                "eopd_exact")  # fmt: skip
    assert all("fkl" in r and "rkl" in r for r in rows)
    # the forward KL to the teacher on the fixed sequences goes down
    assert _mean(rows[-3:], "fkl") < 0.85 * _mean(rows[:3], "fkl"), [r["fkl"] for r in rows]


def test_on_policy_eopd_with_a_teacher_at_another_layout(teacher_dir):
    rows = _run(teacher_dir, "--mode", "onpolicy", "--steps", "12", "--eopd-teacher-tp", "1",
                "--eopd-tau", "0.8", "--eopd-topk", "8")  # fmt: skip
    assert all(0 <= r["gate"] <= 1 for r in rows)
    # the student moves towards the teacher on its own rollouts: the forward KL on the teacher's
    # top-k and the loss go down (a near-uniform random teacher: the sampled reverse-KL estimate
    # is noise at this size, so it is not asserted)
    fkl = [r["fkl"] for r in rows]
    assert _mean(rows[-3:], "fkl") < 0.97 * _mean(rows[:3], "fkl"), fkl
    assert _mean(rows[-3:], "loss") < _mean(rows[:3], "loss")


def test_flags_map_onto_the_schema():
    from megatron_eaopd.config import ConfigError
    from megatron_eaopd.plugin import add_eopd_args, eopd_settings_from_args

    parser = add_eopd_args(argparse.ArgumentParser())
    args = parser.parse_args(["--eopd-tau", "1.5", "--eopd-topk", "8", "--eopd-gate-strict",
                              "--eopd-teacher", "/t", "--eopd-teacher-tp", "2"])  # fmt: skip
    s = eopd_settings_from_args(args)
    assert (s.objective.entropy_threshold, s.objective.top_k, s.objective.gate_strict) == (
        1.5, 8, True,
    )  # fmt: skip
    assert s.objective.name == "eopd" and s.objective.form == "sampled"
    assert (s.teacher, s.teacher_tp, s.teacher_pp) == ("/t", 2, None)
    default = eopd_settings_from_args(parser.parse_args([])).objective
    assert (default.entropy_threshold, default.fkl_coef, default.top_k) == (0.8, 1.0, 16)
    exact = eopd_settings_from_args(parser.parse_args(["--eopd-objective", "eopd_exact"]))
    assert exact.objective.form == "exact"
    with pytest.raises(ConfigError, match="loss.entropy_threshold"):
        eopd_settings_from_args(parser.parse_args(["--eopd-tau", "-1"]))
    with pytest.raises(ConfigError, match="loss.objective"):
        eopd_settings_from_args(parser.parse_args(["--eopd-objective", "nope"]))


def test_offline_refuses_objectives_that_need_samples():
    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.plugin import check_offline

    check_offline(ObjectiveConfig(name="fkl"))
    check_offline(ObjectiveConfig(name="eopd", form="exact"))
    with pytest.raises(ValueError, match="on-policy"):
        check_offline(ObjectiveConfig(name="eopd"))


def test_rollout_micro_batches_pad_to_a_multiple_for_sequence_parallelism():
    """A student built with sequence parallelism needs the sequence length to be a multiple of
    tp: the plugin's batches pad with masked pad tokens and keep every trained position."""
    import torch

    from megatron_eaopd.plugin import rollout_micro_batches
    from megatron_eaopd.rollout import RolloutBatch

    # prompt [1, 5, 6], response [7, 8, 3]; prompt [1, 9], response [4]: 5 positions
    tokens = torch.tensor([[1, 5, 6, 7, 8, 3], [1, 9, 4, 0, 0, 0]])
    r = RolloutBatch(
        tokens=tokens,
        prompt_lens=torch.tensor([3, 2]),
        response_lens=torch.tensor([3, 1]),
        logprobs=torch.tensor([[0, 0, 0, -0.1, -0.2, -0.3], [0, 0, -0.4, 0, 0, 0]]),
        entropies=torch.zeros(2, 6),
        finished=torch.tensor([True, False]),
    )
    plain = rollout_micro_batches(r, 0, 2)
    padded = rollout_micro_batches(r, 0, 2, multiple=4)
    assert len(plain) == len(padded) == 1
    s = plain[0]["tokens"].shape[1]
    assert padded[0]["tokens"].shape[1] % 4 == 0 and padded[0]["tokens"].shape[1] >= s
    for key in ("tokens", "labels", "loss_mask", "old_logprobs"):
        assert torch.equal(padded[0][key][:, :s], plain[0][key])
    assert not padded[0]["loss_mask"][:, s:].any()
    assert (padded[0]["tokens"][:, s:] == 0).all()
