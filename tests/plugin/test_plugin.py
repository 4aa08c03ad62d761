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
    rows = _run(
        teacher_dir,
        "--mode",
        "offline",
        "--steps",
        "12",
        "--eopd-objective",
        "eopd_exact",
        "--eopd-fused-output",
    )  # fmt: skip (fused: hidden states + weight)
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
    assert default.fused_output is None  # the plugin's loss stays unfused without the flag
    fused = eopd_settings_from_args(
        parser.parse_args(["--eopd-fused-output", "--eopd-fused-chunk-size", "64"])
    ).objective
    assert (fused.fused_output, fused.fused_chunk_size) == (True, 64)
    exact = eopd_settings_from_args(parser.parse_args(["--eopd-objective", "eopd_exact"]))
    assert exact.objective.form == "exact"
    with pytest.raises(ConfigError, match=r"--eopd-tau \(loss.entropy_threshold\): out of"):
        eopd_settings_from_args(parser.parse_args(["--eopd-tau", "-1"]))
    with pytest.raises(ConfigError, match=r"--eopd-temperature \(loss.temperature\)"):
        eopd_settings_from_args(parser.parse_args(["--eopd-temperature", "inf"]))
    # the variants' own parameters have flags, refused beside an objective that ignores them
    soft = parser.parse_args(["--eopd-objective", "eopd_soft", "--eopd-soft-gate-width", "0.3"])
    assert eopd_settings_from_args(soft).objective.gate_width == 0.3
    mix = parser.parse_args(["--eopd-objective", "mix", "--eopd-mix-weight", "0.25"])
    assert eopd_settings_from_args(mix).objective.mix_weight == 0.25
    jsd = parser.parse_args(["--eopd-objective", "jsd", "--eopd-jsd-beta", "0.1"])
    assert eopd_settings_from_args(jsd).objective.jsd_beta == 0.1
    with pytest.raises(ConfigError, match=r"--eopd-clip \(loss.clip\): 0.1 is not read by"):
        eopd_settings_from_args(parser.parse_args(["--eopd-objective", "eopd_exact",
                                                   "--eopd-clip", "0.1"]))  # fmt: skip
    with pytest.raises(ConfigError, match="loss.objective"):
        eopd_settings_from_args(parser.parse_args(["--eopd-objective", "nope"]))
    # Megatron-LM's own document-masking flags, on the same namespace
    masked = parser.parse_args([])
    masked.reset_attention_mask = True
    with pytest.raises(ConfigError, match="--reset-attention-mask: document masking"):
        eopd_settings_from_args(masked)
    jsd = "--eopd-fused-output: true is refused for loss.objective=jsd"
    for flags, word in ((["--eopd-teacher-tp", "0"], "--eopd-teacher-tp: must be >= 1"),
                        (["--eopd-teacher-pp", "-2"], "--eopd-teacher-pp: must be >= 1"),
                        (["--eopd-objective", "jsd", "--eopd-fused-output"], jsd)):  # fmt: skip
        with pytest.raises(ConfigError, match=word):
            eopd_settings_from_args(parser.parse_args(flags))


def test_offline_micro_batches_refuse_bad_inputs():
    import torch

    from megatron_eaopd.plugin import offline_micro_batches

    tokens = torch.randint(0, 50, (4, 13))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    assert len(offline_micro_batches(tokens, mask, 2)) == 2
    for args, word in (((tokens, mask[:, :5], 2), "loss_mask"),
                       ((tokens, mask, 0), "micro_batch_size must be >= 1"),
                       ((tokens.float(), mask, 2), "integer ids"),
                       ((tokens[:, :1], mask[:, :1], 2), "S >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            offline_micro_batches(*args)


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
    # by_length: longest row first, each micro-batch cut to its own longest row
    cut = rollout_micro_batches(r, 0, 1, by_length=True)
    assert [mb["tokens"].shape[1] for mb in cut] == [6, 3]
    for mb, row in zip(cut, (0, 1)):
        for key in ("tokens", "labels", "loss_mask", "old_logprobs"):
            assert torch.equal(mb[key][0], plain[0][key][row, : mb[key].shape[1]]), key
        assert int(mb["loss_mask"].sum()) == int(plain[0]["loss_mask"][row].sum())
    # a token budget: 6 positions hold the 6-token row alone, 12 both rows (padded to 6)
    assert [
        tuple(mb["tokens"].shape)
        for mb in rollout_micro_batches(r, 0, 2, by_length=True, max_tokens=6)
    ] == [(1, 6), (1, 3)]
    (both,) = rollout_micro_batches(r, 0, 2, by_length=True, max_tokens=12)
    assert torch.equal(both["tokens"], plain[0]["tokens"])
    with pytest.raises(ValueError, match="by_length"):
        rollout_micro_batches(r, 0, 2, max_tokens=12)  # fmt: skip


VOCAB = 250


def _student_and_teacher(tp: int, student_dtype: str = "float32"):
    """A 1-layer student (``student_dtype``) and an fp32 EOPDTeacher of the same shape at TP
    ``tp``, plus teacher-forced tokens [2, 11] and a loss mask."""
    import torch

    from megatron_eaopd.models import ModelConfig, build_model
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import (
        add_layout,
        initialize_parallel,
        register_current_layout,
        use_layout,
    )
    from megatron_eaopd.plugin import STUDENT_LAYOUT, TEACHER_LAYOUT, EOPDTeacher

    initialize_parallel(tp, 1, seed=1)
    register_current_layout(STUDENT_LAYOUT)
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, vocab_size=VOCAB, max_sequence_length=16,
        make_vocab_size_divisible_by=8, untie_embeddings_and_output_weights=True,
    )  # fmt: skip
    student = build_model(cfg.with_changes(params_dtype=student_dtype),
                          calculate_per_token_loss=True)[0]  # fmt: skip
    layout = add_layout(TEACHER_LAYOUT, tp, 1, seed=7)
    with use_layout(TEACHER_LAYOUT):
        teacher = EOPDTeacher(FrozenTeacher(build_model(cfg)), cfg, layout)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=gen)
    mask = torch.rand(2, 11, generator=gen) > 0.3
    return student, teacher, tokens, mask


def _fused_and_padded_worker(rank, world):
    """At TP 2: the plugin's loss with fused=True against fused=False (exact form with the
    teacher's hidden states against its logits; the sampled forward KL with the same payload),
    and offline micro-batches padded to a multiple of 4 against unpadded ones (exact form,
    unfused): loss sums, reported metrics and every parameter gradient."""
    import torch

    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.parallel.init import destroy_parallel
    from megatron_eaopd.plugin import eopd_forward_step, offline_micro_batches

    student, teacher, tokens, mask = _student_and_teacher(2)
    vocab = VOCAB

    def run(objective, micro, fused):
        for p in student.parameters():
            p.grad = None
        step = eopd_forward_step(objective, vocab, fused=fused)
        output, loss_func = step(iter(micro), student)
        loss_sum, count, reported = loss_func(output)
        loss_sum.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        return float(loss_sum), int(count), {k: v.tolist() for k, v in reported.items()}, grads

    out = {}
    exact = ObjectiveConfig(name="eopd", form="exact", fused_chunk_size=5)
    fkl = ObjectiveConfig(name="fkl", top_k=4, fused_chunk_size=5)
    for name, objective in (("exact", exact), ("fkl", fkl)):
        runs = []
        for fused in (False, True):
            micro = offline_micro_batches(tokens, mask, 2)
            if name == "exact":
                teacher.attach_logits(micro, fused=fused)
                kept = micro[0]["teacher"]
                assert isinstance(kept, tuple) == fused  # hidden states and weight, or logits
            else:
                teacher.attach(micro, k=4, vocab_size=vocab)
                assert all(mb["teacher_k"] == 4 for mb in micro)  # every rank, every stage
            runs.append(run(objective, micro, fused))
        out[name] = runs
    padded = offline_micro_batches(tokens, mask, 2, multiple=4, pad_id=7)
    plain = offline_micro_batches(tokens, mask, 2)
    for micro in (padded, plain):
        teacher.attach_logits(micro)
    out["padded"] = [run(exact, plain, False), run(exact, padded, False)]
    out["shapes"] = [list(padded[0]["tokens"].shape), list(plain[0]["tokens"].shape)]
    out["pad"] = {k: padded[0][k][:, 10:].tolist() for k in ("tokens", "labels", "loss_mask")}
    out["same_prefix"] = (
        all(
            torch.equal(padded[0][k][:, :10], plain[0][k])
            for k in ("tokens", "labels", "position_ids", "loss_mask")
        )
        and "old_logprobs" not in padded[0]
    )
    out["fkl_metrics"] = sorted(out["fkl"][0][2])
    # TP ranks given different micro-batches computed a finite, wrong loss: attach_logits'
    # first call compares them (the teacher above passed it: same tokens on both ranks)
    from megatron.core import parallel_state as ps

    from megatron_eaopd.plugin.teacher import _check_same_tokens

    try:
        _check_same_tokens(tokens.roll(rank, dims=1), ps.get_tensor_model_parallel_group())
        out["differ"] = None
    except ValueError as exc:
        out["differ"] = str(exc)
    destroy_parallel()
    return out


def test_fused_loss_and_offline_padding_match_the_plain_path():
    """The plugin's fused student loss (eopd_forward_step(fused=True), attach_logits(fused=True))
    gives the unfused loss, metrics and gradients at TP 2 (fp32: 1e-5 values, 1e-4 gradients);
    offline_micro_batches(multiple=4) pads with masked pad tokens and gives the unpadded loss
    and gradients."""
    import torch

    from tests.dist import run_distributed

    for res in run_distributed(_fused_and_padded_worker, 2, timeout=600):
        for name in ("exact", "fkl", "padded"):
            (loss_a, n_a, rep_a, g_a), (loss_b, n_b, rep_b, g_b) = res[name]
            assert n_a == n_b > 0, name
            assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6), name
            assert sorted(rep_a) == sorted(rep_b), name
            for key in rep_a:
                assert rep_b[key] == pytest.approx(rep_a[key], rel=1e-5, abs=1e-6), (name, key)
            for a, b in zip(g_a, g_b):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
            assert any(float(g.abs().sum()) > 0 for g in g_a), name
        assert res["shapes"] == [[2, 12], [2, 10]] and res["same_prefix"]
        assert "ranks of one group hold different micro-batches" in res["differ"]  # both ranks
        # teacher-forced data has no rollout: no PPO metrics made up from placeholder log-probs
        assert "fkl" in res["fkl_metrics"]
        assert not {"pg_loss", "ratio", "advantage", "clip_frac"} & set(res["fkl_metrics"])
        assert res["pad"] == {"tokens": [[7, 7]] * 2, "labels": [[7, 7]] * 2,
                              "loss_mask": [[False, False]] * 2}  # fmt: skip


def _float16_worker(rank, world):
    from megatron.core.transformer.module import Float16Module

    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.parallel.init import destroy_parallel
    from megatron_eaopd.plugin import eopd_forward_step, offline_micro_batches

    student, teacher, tokens, mask = _student_and_teacher(1, "bfloat16")
    wrapped = Float16Module(student.config, student)  # Megatron-LM's --bf16: fp32 out
    vocab = VOCAB
    objective = ObjectiveConfig(name="fkl", top_k=4, fused_chunk_size=5)
    losses = []
    for fused in (False, True):
        micro = offline_micro_batches(tokens, mask, 2)
        teacher.attach(micro, k=4, vocab_size=vocab)
        output, loss_func = eopd_forward_step(objective, vocab, fused=fused)(iter(micro), wrapped)
        losses.append(float(loss_func(output)[0]))
    destroy_parallel()
    return losses


def test_fused_loss_under_megatron_float16_module():
    """Megatron-LM's --bf16 wraps the model in Float16Module, which returns fp32 outputs: the
    fused loss (bf16 output weight) used to refuse the dtype mix; it equals the unfused one."""
    import math

    from tests.dist import run_distributed

    (unfused, fused), *_ = run_distributed(_float16_worker, 1, timeout=300)
    assert math.isfinite(unfused) and fused == pytest.approx(unfused, rel=1e-3)


def test_forward_step_refuses_packed_sequences_and_another_top_k():
    """Checked before the model runs: no process group is needed to reach the errors."""
    import torch

    from megatron_eaopd.losses import ObjectiveConfig, TeacherPayload
    from megatron_eaopd.plugin import check_micro_batch, eopd_forward_step

    objective = ObjectiveConfig(top_k=16)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    mb = {"tokens": tokens, "labels": tokens, "position_ids": tokens,
          "loss_mask": tokens.bool(), "packed_seq_params": object()}  # fmt: skip
    step = eopd_forward_step(objective, 64)
    with pytest.raises(ValueError, match="packed sequences"):
        step(iter([mb]), model=None)
    payload = TeacherPayload(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 5, 4),
                             torch.zeros(2, 5, 4, dtype=torch.long))  # fmt: skip
    mb.update(packed_seq_params=None, teacher=payload)
    with pytest.raises(ValueError, match="4 top-k columns but the objective's top_k is 16"):
        step(iter([mb]), model=None)
    check_micro_batch(mb, ObjectiveConfig(top_k=4))  # the width the objective asks for
    # a stage before the last: no payload, the width attach recorded on every rank
    earlier = dict(mb, teacher=None, teacher_k=4)
    with pytest.raises(ValueError, match="4 top-k columns but the objective's top_k is 16"):
        step(iter([earlier]), model=None)
    check_micro_batch(earlier, ObjectiveConfig(top_k=4))
    check_micro_batch(mb, ObjectiveConfig(name="opd"))  # no forward KL: any width serves
    check_micro_batch(dict(mb, attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool)))
    # a payload scored at another temperature than the loss's (attach records it on every rank)
    hot = dict(earlier, teacher_k=16, teacher_temperature=0.5)
    with pytest.raises(ValueError, match="scored at temperature 0.5 but the objective's"):
        step(iter([hot]), model=None)
    check_micro_batch(hot, ObjectiveConfig(top_k=16, temperature=0.5))
    # attach forgotten: refused on every stage (the last one's loss alone raised before)
    bare = dict(mb, teacher=None)
    with pytest.raises(ValueError, match="a micro-batch without a teacher: call teacher.attach"):
        step(iter([bare]), model=None)
    check_micro_batch(bare)  # no objective: nothing to check against


def test_forward_step_refuses_a_model_without_per_token_loss():
    """Without calculate_per_token_loss megatron averages each micro-batch's token SUM as if it
    were a mean: a silently different gradient. Refused at the first call, on every stage,
    through megatron's own get_model_config (DDP-style .module wrappers included)."""
    from types import SimpleNamespace

    import torch

    from megatron_eaopd.losses import ObjectiveConfig
    from megatron_eaopd.plugin import eopd_forward_step

    tokens = torch.zeros(2, 5, dtype=torch.long)
    mb = {
        "tokens": tokens,
        "labels": tokens,
        "position_ids": tokens,
        "loss_mask": tokens.bool(),
        "teacher": None,
        "teacher_k": 16,
    }  # a stage before the last, after attach
    wrapped = SimpleNamespace(module=SimpleNamespace(
        config=SimpleNamespace(calculate_per_token_loss=False)))  # fmt: skip
    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        eopd_forward_step(ObjectiveConfig(), 64)(iter([mb]), wrapped)


def _rng_worker(rank, world, folder):
    import torch

    from megatron_eaopd.parallel.init import destroy_parallel, initialize_parallel
    from megatron_eaopd.plugin import EOPDTeacher

    initialize_parallel(1, 1, seed=1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    EOPDTeacher.load(folder)
    kept = torch.equal(before, torch.get_rng_state())
    destroy_parallel()
    return kept


def test_loading_the_teacher_leaves_torchs_generator_as_it_was(teacher_dir):
    """EOPDTeacher.load built the teacher with torch's generator: the caller's next draws (its
    own student's initialisation) depended on which teacher it loaded."""
    from tests.dist import run_distributed

    assert run_distributed(_rng_worker, 1, teacher_dir, timeout=300) == [True]


def _refusals_worker(rank, world, folder):
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_eaopd.parallel.init import destroy_parallel, initialize_parallel
    from megatron_eaopd.plugin import EOPDTeacher

    initialize_parallel(1, 1, seed=1)
    teacher = EOPDTeacher.load(folder)
    tokens = torch.zeros(0, 6, dtype=torch.long)
    errors = []
    for micro, kw in (([{"tokens": tokens, "labels": tokens}], {}),  # no rows
                      ([], {"k": 500}), ([], {"temperature": 0.0}),
                      ([], {"vocab_size": 1000})):  # fmt: skip
        args = dict(k=4, vocab_size=teacher.model_config.vocab_size) | kw
        try:
            teacher.attach(micro, **args)
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    ids = torch.full((1, 6), 205)  # past the 200 ids: a padding row's logits, no error
    full = {"tokens": ids, "labels": ids, "position_ids": torch.arange(6)[None],
            "loss_mask": torch.ones(1, 6, dtype=torch.bool)}  # fmt: skip
    for call in (lambda: EOPDTeacher.load(None),  # --eopd-teacher left out: a TypeError
                 lambda: teacher.attach_logits([full]),
                 lambda: teacher.attach_logits([{"tokens": ids}])):  # fmt: skip
        try:
            call()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    get_cuda_rng_tracker().reset()  # a caller that never seeded megatron's tracker
    try:
        EOPDTeacher.load(folder)
        errors.append(None)
    except RuntimeError as exc:
        errors.append(str(exc))
    destroy_parallel()
    return errors


def test_attach_and_load_refuse_bad_arguments_before_any_collective(teacher_dir):
    """attach's arguments and empty micro-batches are checked on every rank before the
    exchange (the payload kernels raised them on the scoring ranks only, leaving the others
    waiting for the group's timeout); load refuses an unseeded RNG tracker (the teacher forward
    failed in attach, on the scoring ranks only)."""
    from tests.dist import run_distributed

    [errors] = run_distributed(_refusals_worker, 1, teacher_dir, timeout=300)
    rows, k, temperature, vocab, no_teacher, ids, keys, seed = errors
    assert "the teacher None is not a folder" in no_teacher and "--eopd-teacher" in no_teacher
    assert "token ids 205..205 outside the teacher's vocabulary [0, 200)" in ids
    assert "a micro-batch without labels, loss_mask, position_ids" in keys
    assert "a micro-batch with 0 rows or 0 positions" in rows
    assert "k=500 must be an int in [1, vocab_size=200]" in k
    assert "temperature must be a finite number > 0" in temperature
    assert "vocab_size=1000 is larger than the teacher's vocabulary (200)" in vocab
    assert "model_parallel_cuda_manual_seed" in seed


def test_sequence_parallel_micro_batches_of_an_odd_length_name_the_fix(monkeypatch):
    """Without multiple= megatron stopped on its own assertion ('First dimension of the tensor
    should be divisible by tensor parallel size'), naming no fix."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_eaopd.plugin.forward import _check_sequence_multiple

    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 2)
    rows = torch.zeros(2, 7, dtype=torch.long)
    with pytest.raises(ValueError, match=r"length \(7\) is a multiple of TP \(2\).*multiple="):
        _check_sequence_multiple({"tokens": None, "labels": rows})  # a middle stage: no tokens
    _check_sequence_multiple({"tokens": torch.zeros(2, 8, dtype=torch.long)})
