"""The memory planner against measurements and published figures.

* Measured: one student update step (megatron's schedule, DDP, Adam, the EOPD loss) of a
  small fp32 model on 2 gloo ranks at three layouts (TP 2, PP 2, TP 1 x DP 2; fused, and the
  logits path at TP 2), with sequence parallelism at TP 2, and in the exact form (the trainer's
  teacher pass attaching the teacher's logits or hidden states, then the update): the growth of
  the process's peak RSS during the step (VmHWM reset through /proc/self/clear_refs, freed
  tensors returned to the OS by MALLOC_MMAP_THRESHOLD_) must be within 25% of
  `student_update_terms(...)["activations"]` with the "local" spec, and during the exact form's
  teacher pass within 25% of the planner's teacher scoring; the kept teacher tensors exactly
  `teacher_kept_bytes`; the persistent state (weights, fp32 grad buffer, Adam moments: the bytes
  of the actual tensors) within 1% of the planner's weights + grads + optimizer state.
* Published measurements: a full training step of Megatron-LM's own functional test
  gpt3_7b_tp4_pp1_memory_speed (its golden values: allocated and peak bytes per H100), and the
  loss terms against Cut Cross-Entropy's measured peaks at Gemma 2 (2B)'s classifier.
* Formula checks (published formulas, not measurements): the "korthikanti" spec reproduces
  Korthikanti et al. 2022 eq. (1), (2) and (4); the model states of a 7.5B model under
  mixed-precision Adam are ZeRO's 16 bytes per parameter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_eaopd import plan as P
from megatron_eaopd.plan.cli import main
from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(ROOT, "configs", "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml")
TINY = os.path.join(ROOT, "configs", "tiny-cpu.yaml")

SHAPE = dict(layers=2, hidden=256, heads=4, query_groups=2, ffn_hidden=512, vocab_size=8192)
SEQ, MB, MICRO, K, CHUNK = 256, 4, 2, 4, 128
# (tp, pp, fused, loss form, sequence parallel[, training.recompute]) on 2 ranks
LAYOUTS = [
    (2, 1, True, "sampled", False), (1, 2, True, "sampled", False),
    (1, 1, True, "sampled", False), (2, 1, False, "sampled", False),
    (2, 1, True, "sampled", True), (2, 1, False, "sampled", True),
    (2, 1, True, "exact", False), (2, 1, False, "exact", False),
    (2, 1, True, "sampled", False, "selective"), (1, 2, True, "sampled", False, "full"),
]  # fmt: skip
CHEAP = [(2, 1, True, "exact", True)]  # the default (not slow) case: both new terms at once


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> int:
    """Reset the process's peak RSS (VmHWM) to the current RSS and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss("VmRSS")


def _worker(rank, world, layouts):
    """Per layout: the growth of peak RSS while the trainer's exact-form teacher pass attaches
    the teacher's tensors (exact form only) and during the second of two optimizer steps."""
    import torch

    from megatron_eaopd.losses import ObjectiveConfig, TeacherPayload
    from megatron_eaopd.models import ModelConfig, build_model
    from megatron_eaopd.models.student import OptimConfig
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import destroy_parallel, initialize_layouts, use_layout
    from megatron_eaopd.trainer.build import STUDENT, TEACHER, build_trainable
    from megatron_eaopd.trainer.scoring import attach_teacher_logits
    from megatron_eaopd.trainer.update import distill_forward_step, optimizer_step

    cfg = ModelConfig(
        num_layers=SHAPE["layers"], hidden_size=SHAPE["hidden"], num_attention_heads=SHAPE["heads"],
        num_query_groups=SHAPE["query_groups"], ffn_hidden_size=SHAPE["ffn_hidden"],
        vocab_size=SHAPE["vocab_size"], max_sequence_length=SEQ, make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights=True,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    v = SHAPE["vocab_size"]

    def micro_batch(form):
        mb = {
            "tokens": torch.randint(0, v, (MB, SEQ), generator=gen),
            "labels": torch.randint(0, v, (MB, SEQ), generator=gen),
            "position_ids": torch.arange(SEQ).expand(MB, SEQ),
            "loss_mask": torch.ones(MB, SEQ, dtype=torch.bool),
            "old_logprobs": torch.full((MB, SEQ), -2.0),
        }
        if form == "sampled":
            top = torch.randn(MB, SEQ, K, generator=gen).sort(-1, descending=True).values - 2.0
            mb["teacher"] = TeacherPayload(
                torch.rand(MB, SEQ, generator=gen) * 2, torch.full((MB, SEQ), -1.5), top,
                torch.randint(0, v, (MB, SEQ, K), generator=gen),
            )  # fmt: skip
        return mb

    out = []
    for tp, pp, fused, form, sp, *recompute in layouts:
        destroy_parallel()
        initialize_layouts({STUDENT: (tp, pp, None), TEACHER: (tp, 1, None)}, seed=1)
        student = build_trainable(cfg, OptimConfig(lr=1e-4, total_steps=10), seed=0,
                                  sequence_parallel=sp,
                                  recompute=recompute[0] if recompute else "none")  # fmt: skip
        objective = ObjectiveConfig(name="eopd", form=form, top_k=K, fused_output=fused,
                                    fused_chunk_size=CHUNK)  # fmt: skip
        step = distill_forward_step(objective, v)
        micro = [micro_batch(form) for _ in range(MICRO)]
        row = {"scoring": 0, "kept": 0}
        if form == "exact":
            with use_layout(TEACHER):
                teacher = FrozenTeacher(build_model(cfg))
            base = _reset_peak()
            attach_teacher_logits(teacher, micro, fused=fused)
            row["scoring"] = _rss("VmHWM") - base
            first = micro[0]["teacher"]
            first = first[0] if isinstance(first, tuple) else first
            row["kept"] = MICRO * first.numel() * first.element_size()
        with use_layout(STUDENT):
            optimizer_step(student, step, micro, SEQ, MB)  # Adam's state now exists
            row["state"] = sum(t.numel() * t.element_size() for t in _state_tensors(student))
            base = _reset_peak()
            optimizer_step(student, step, micro, SEQ, MB)
            row["peak"] = _rss("VmHWM") - base
        out.append(row)
        del student, micro
    destroy_parallel()
    return out


def _state_tensors(student):
    """Distinct storages of the weights, DDP grad buffers and optimizer states."""
    import torch

    seen, out = set(), []

    def add(t):
        if torch.is_tensor(t) and t.numel() > 1:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out.append(torch.empty(st.nbytes(), dtype=torch.uint8))

    for chunk in student.chunks:
        for p in chunk.parameters():
            add(p)
        for buf in getattr(chunk, "buffers", []):
            add(buf.grad_data)
    opt = student.optimizer
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for st in sub.optimizer.state.values():
            for t in st.values():
                add(t)
    return out


def _predicted(tp, pp, fused, form, sp, recompute="none"):
    """The planner's (update activations under ``recompute``, teacher scoring, kept teacher
    tensors, persistent student state) for a layout of the measured runs ("local" spec, fp32)."""
    shape = P.Shape(**SHAPE, tied=False, dtype="fp32")
    lay = P.Layout(tp, pp, 2 // (tp * pp))
    from megatron_eaopd.losses._kernels import compile_enabled  # the workers' EAOPD_COMPILE

    batch = P.Batch(MB, SEQ, MICRO, 1, MB * MICRO, top_k=K, chunk_elems=CHUNK * 8192 // tp,
                    compiled_kernels=compile_enabled())  # fmt: skip
    terms = P.student_update_terms(shape, lay, batch, fused=fused, spec="local",
                                   sequence_parallel=sp)  # fmt: skip
    _, rt = P.plan_memory(shape, shape, lay, P.Layout(tp, 1, 2 // tp), batch, fused=fused,
                          spec="local", form=form, sequence_parallel=sp)  # fmt: skip
    kept = P.teacher_kept_bytes(shape, P.Layout(tp, 1), batch, fused=fused, form=form)
    ps = max(P.stage_params(shape, lay, i) for i in range(pp))
    acts = terms[{"none": "activations", "full": "activations (recompute)",
                  "selective": "activations (selective)"}[recompute]]  # fmt: skip
    return acts, rt.parts["teacher scoring"], kept, ps * (4 + 4 + 8)


def _compare(layouts, results, over=0.25):
    """Assert the planner within 25% of the measured step (and exact-form scoring) peaks (the
    step may be over-counted by ``over``), the kept teacher tensors and the persistent state
    within 1%; return the table rows (MiB)."""
    rows = []
    for i, layout in enumerate(layouts):
        acts, scoring, kept, state = _predicted(*layout)
        peak = max(r[i]["peak"] for r in results)
        m_state = max(r[i]["state"] for r in results)
        m_scoring = max(r[i]["scoring"] for r in results)
        m_kept = max(r[i]["kept"] for r in results)
        rows.append([layout] + [x / 2**20 for x in (peak, acts, m_scoring, scoring, m_state)])
        assert -0.25 * peak <= acts - peak <= over * peak, (layout, peak, acts)
        assert abs(m_state - state) <= 0.01 * m_state, (layout, m_state, state)
        if layout[3] == "exact":
            assert m_kept == kept, (layout, m_kept, kept)
            assert abs(scoring - m_scoring) <= 0.25 * m_scoring, (layout, m_scoring, scoring)
    print("\n(tp, pp, fused, form, sp)  step MiB measured, planned; exact-form scoring MiB "
          "measured, planned; state MiB")  # fmt: skip
    for row in rows:
        print(row[0], " ".join(f"{x:7.1f}" for x in row[1:]))
    return rows


_EAGER_PAIR = (
    "eager kernels only (EAOPD_COMPILE=0, as tests/conftest.py sets): the exact form's unfused "
    "pair kernels keep ~7 fp32 [rows, V_pad / tp] temporaries, the planner counts 3 (measured "
    "197.9 MiB, planned 132.2; compiled, the default: 71.0 against 84.2), docs/memory.md"
)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    pytest.param(lay, marks=pytest.mark.xfail(strict=True, reason=_EAGER_PAIR))
    if lay == (2, 1, False, "exact", False) else lay
    for lay in LAYOUTS
], ids=str)  # fmt: skip
def test_planner_matches_measured_peak_memory(monkeypatch, layout):
    """Each layout in its own pair of processes (a layout measured after others in the same
    process reuses their freed heap: the exact form's teacher pass measured 11.8 MiB 7th in a
    process, 19.4 first)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned workers
    _compare([layout], run_distributed(_worker, 2, [layout], timeout=600))


def test_planner_matches_measured_peak_memory_exact_form_with_sequence_parallelism(monkeypatch):
    """The cheap default case: TP 2 with sequence parallelism, the exact form fused (the
    teacher's hidden states kept for both micro-batches), one teacher pass and one update."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    _compare(CHEAP, run_distributed(_worker, 2, CHEAP, timeout=600))


def test_recompute_saves_memory_as_planned(monkeypatch):
    """training.recompute at TP 2 (fused loss), each setting in its own processes: full
    recompute must cut the measured step peak to under 60% of the same step without it (53 ->
    25 MiB here: the two layers' activations are gone, their inputs kept), and the planner's
    update under each setting is within 25% below and 35% above the measured peak (full is
    over-counted by ~30% here: the planner adds one recomputed layer's activations and
    gradients, megatron frees them part by part; on the safe side). Selective recompute and
    full recompute under PP 2 are among the slow layouts."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    peaks = {}
    for mode in ("none", "full"):
        layout = (2, 1, True, "sampled", False, mode)
        results = run_distributed(_worker, 2, [layout], timeout=600)
        _compare([layout], results, over=0.35)
        peaks[mode] = max(r[0]["peak"] for r in results)
    assert peaks["full"] < 0.6 * peaks["none"], peaks


@pytest.mark.parametrize("s, b, h, a, t", [(2048, 1, 12288, 96, 8), (4096, 2, 4096, 32, 1),
                                           (1024, 4, 2048, 16, 2)])  # fmt: skip
def test_korthikanti_spec_is_the_published_formula(s, b, h, a, t):
    """A formula check, not a measurement: Korthikanti et al. 2022 eq. (1) sbh (34 + 5as/h) at
    t = 1, eq. (2) sbh (10 + 24/t + 5as/(ht)) with TP and eq. (4) sbh / t (34 + 5as/h) with
    sequence parallelism, in bytes, from the planner's itemised terms."""
    shape = P.Shape(layers=1, hidden=h, heads=a, query_groups=a, ffn_hidden=4 * h, vocab_size=8)
    got = sum(P.layer_activation_terms(shape, s * b, s, t, "korthikanti").values())
    published = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert got == pytest.approx(published, rel=1e-12)
    if t == 1:
        assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h), rel=1e-12)
    # with sequence parallelism, eq. (4): sbh / t (34 + 5as/h)
    sp = sum(P.layer_activation_terms(shape, s * b, s, t, "korthikanti", True).values())
    assert sp == pytest.approx(s * b * h / t * (34 + 5 * a * s / h), rel=1e-12)
    assert P.korthikanti_per_layer(s, b, h, a, t, sequence_parallel=True) == pytest.approx(sp)


def test_loss_terms_against_the_cut_cross_entropy_measurement():
    """A published MEASURED peak of the loss alone: Cut Cross-Entropy (Wijmans et al., ICLR 2025,
    arXiv:2411.09009, Table 1; the benchmark output in apple/ml-cross-entropy's README,
    A100-SXM4-80GB, PyTorch 2.4.1) measures the extra memory of the loss at Gemma 2 (2B)'s
    classifier: 8,192 tokens, hidden 2,304, 256,000 columns, bf16. Forward with the logits
    materialised (torch.compile): 4000.1 MB; forward + backward fused (CCE): 1164.0 MB (MiB).
    The planner, for that shape: the unfused loss's logits are the measured forward within 1%;
    its fused loss (our implementation) is 2.13x CCE's, and the two differences it itemises, the
    fp32 accumulator of the weight gradient (CCE writes it in bf16: 2 bytes per weight more) and
    three fp32 [chunk, V] buffers (CCE keeps its blocks on chip), account for the gap within 1%."""
    mib = 2**20
    v, h, n = 256000, 2304, 8192
    gemma = P.Shape(layers=26, hidden=h, heads=8, query_groups=4, ffn_hidden=9216,
                    vocab_size=v, kv_channels=256, tied=True, dtype="bf16")  # fmt: skip
    batch = P.Batch(micro_batch=1, seq=n, micro_batches=1, steps=1, rows=1)
    lay = P.Layout(1, 1, 1)
    fused = P.student_update_terms(gemma, lay, batch, fused=True, spec="te")["loss"]
    unfused = P.student_update_terms(gemma, lay, batch, fused=False, spec="te")["loss"]
    chunks = 3 * (batch.chunk_elems // v) * v * 4  # the fused path's fp32 chunk buffers
    logits = (unfused - v * h * 2) / 2  # the planner's logits (and their gradient; compiled)
    assert logits == pytest.approx(4000.1 * mib, rel=0.01)
    assert fused / (1164.0 * mib) == pytest.approx(2.13, abs=0.02)
    assert fused - v * h * (4 - 2) - chunks == pytest.approx(1164.0 * mib, rel=0.01)


# Megatron-LM's functional test gpt3_7b_tp4_pp1_memory_speed (NVIDIA/Megatron-LM,
# tests/functional_tests/test_cases/gpt/gpt3_7b_tp4_pp1_memory_speed: model_config.yaml and
# golden_values_dev_dgx_h100.json; 8 H100s per tests/test_utils/recipes/h100/gpt.yaml): 32 layers,
# hidden 4096, 32 heads, 8 query groups, 4h GELU MLP, vocabulary 131,072, untied, bf16, TE,
# sequence 8,192, micro-batch 2, global batch 8, TP 4 x PP 1 x DP 2, distributed optimizer.
# torch.cuda.memory_stats per rank, as the training loop logs them (bytes):
MEGATRON_CI_ALLOCATED = 20_663_519_232  # mem-allocated-bytes after every step
MEGATRON_CI_PEAK_STEP1 = 50_289_487_872  # mem-max-allocated-bytes at step 1 (no Adam moments)
MEGATRON_CI_PEAK = 57_143_791_616  # mem-max-allocated-bytes from step 2 on


def test_full_step_against_megatron_lm_ci_golden_values():
    """A published MEASURED full training step of a known Megatron setup (MEGATRON_CI_*): the
    planner's persistent state (bf16 weights, fp32 grad buffer, fp32 main weights and Adam
    moments split over DP 2) is within 3% of the allocated bytes between steps, its Adam moments
    within 3% of the step-2 minus step-1 peaks (the moments are allocated at the first step), and
    its peak (persistent + the update's activations, "te" spec) within 10% of the measured peak
    (docs/memory.md: -2.6%, -2.1% and -6.5%; what the planner leaves out - the learned position
    embedding, biases, dropout masks - is itemised there)."""
    shape = P.Shape(layers=32, hidden=4096, heads=32, query_groups=8, ffn_hidden=16384,
                    vocab_size=131072, swiglu=False, tied=False, dtype="bf16")  # fmt: skip
    lay = P.Layout(tp=4, pp=1, dp=2)
    batch = P.Batch(micro_batch=2, seq=8192, micro_batches=2, steps=1, rows=4)
    rs, _ = P.plan_memory(shape, shape, lay, lay, batch, fused=False, spec="te",
                          distributed_optimizer=True)  # fmt: skip
    parts = rs.parts
    persistent = sum(
        parts[f"persistent: {k}"]
        for k in ("student weights", "student grads (fp32)", "optimizer state")
    )
    assert persistent == pytest.approx(MEGATRON_CI_ALLOCATED, rel=0.03)
    moments = 8 * P.stage_params(shape, lay, 0) / lay.dp
    assert moments == pytest.approx(MEGATRON_CI_PEAK - MEGATRON_CI_PEAK_STEP1, rel=0.03)
    update = parts["update"] - parts[P.KEPT]  # a plain GPT step keeps no teacher tensors
    assert persistent + update == pytest.approx(MEGATRON_CI_PEAK, rel=0.10)
    assert persistent - moments + update == pytest.approx(MEGATRON_CI_PEAK_STEP1, rel=0.10)


def test_model_states_per_parameter_match_zero():
    """ZeRO (Rajbhandari et al. 2020, sec. 3.1 / fig. 1): mixed-precision Adam keeps 2 bytes of
    fp16 weights and K = 12 bytes of fp32 master, momentum and variance per parameter; with the
    optimizer state partitioned over Nd = 64 ranks (ZeRO-1, megatron's distributed optimizer) the
    12 bytes become 12 / 64. The trainer's gradient buffer is fp32 (4 bytes, ZeRO counts 2)."""
    shape = P.Shape(layers=4, hidden=512, heads=8, query_groups=8, ffn_hidden=2048,
                    vocab_size=1000, dtype="bf16")  # fmt: skip
    batch = P.Batch(1, 16, 1, 1, 1)
    for dist_opt, nd in ((False, 1), (True, 64)):
        lay = P.Layout(1, 1, 64)
        rs, _ = P.plan_memory(shape, shape, lay, lay, batch, distributed_optimizer=dist_opt)
        psi = P.stage_params(shape, lay, 0)
        assert rs.parts["persistent: student weights"] == 2 * psi
        assert rs.parts["persistent: student grads (fp32)"] == 4 * psi
        assert rs.parts["persistent: optimizer state"] == pytest.approx(12 * psi / nd)


def test_stage_params_count_megatron_layers():
    """Parameter count of a Qwen3-8B-shaped model (8.19B with the untied output layer, the
    published size of Qwen3-8B) and its split over TP 2 x PP 2 stages."""
    shape = P.Shape(layers=36, hidden=4096, heads=32, query_groups=8, ffn_hidden=12288,
                    vocab_size=151936, kv_channels=128, qk_layernorm=True)  # fmt: skip
    total = P.stage_params(shape, P.Layout(1, 1), 0)
    assert 8.1e9 < total < 8.3e9
    split = [P.stage_params(shape, P.Layout(2, 2), i) for i in range(2)]
    norms = 36 * (2 * 4096 + 2 * 128) + 4096  # replicated over TP
    pad = P.padded_vocab(151936, 2) - P.padded_vocab(151936, 1)  # 152,064 - 151,936 at TP 2
    assert pad == 128
    assert 2 * sum(split) == total + norms + 2 * pad * 4096


def test_cli_on_the_paper_config(capsys):
    """eaopd-plan on configs/qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml (HF folders absent: presets)."""
    assert main(["--config", PAPER]) == 0
    out = capsys.readouterr().out
    assert "TP 2 x PP 2 x DP 2" in out and "preset qwen3-8b" in out
    assert "fits (fused, training.recompute=none, this config): A100-40GB" in out
    assert "H200-141GB yes" in out
    # docs/memory.md shows this output: its block must be the tool's (it went stale)
    doc = (Path(PAPER).parents[1] / "docs" / "memory.md").read_text(encoding="utf-8")
    shown = doc.split(f"$ eaopd-plan --config configs/{Path(PAPER).name}\n", 1)[1]
    shown = shown.split("```", 1)[0].rstrip("\n").split("\n")
    assert out.split("\n")[: len(shown)] == shown
    assert main(["--config", TINY, "--vocab-size", "1000", "--world-size", "2"]) == 0
    assert "vocab 1000, fp32" in capsys.readouterr().out  # the size planned, not the key's 0
    # the shared base config has no student: the planned default shape is said to be one
    base = os.path.join(ROOT, "configs", "qwen3-8b-paper.yaml")
    assert main(["--config", base, "--vocab-size", "151936"]) == 0
    out = capsys.readouterr().out
    assert "note: student: no model.student_hf" in out and "note: teacher: no" not in out
    # training.recompute=full: the fits line and the rows follow it, the forward all-reduces
    # of the recomputed layers counted (6 per layer instead of 4)
    assert main(["--config", PAPER, "training.recompute=full", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["--config", PAPER, "--json"]) == 0
    none = json.loads(capsys.readouterr().out)
    for name in ("fused", "logits"):
        f, n = full["variants"][name], none["variants"][name]
        assert f["peak_configured"] == f["peak_recompute"] < n["peak_configured"] == n["peak"]
        ratio = f["comm"]["student TP all-reduces"] / n["comm"]["student TP all-reduces"]
        assert ratio == pytest.approx(1.5)
    assert full["rows_that_fit"]["rows"]["A100-40GB"] > none["rows_that_fit"]["rows"]["A100-40GB"]
    assert main(["--config", PAPER, "training.recompute=full"]) == 0
    assert "fits (fused, training.recompute=full, this config): A100-40GB yes" in (
        capsys.readouterr().out
    )
    assert main(["--config", PAPER, "--json"]) == 0
    assert main(["--config", PAPER, "--world-size", "6"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert main(["--config", PAPER, "loss.fused_chunk_size=0"]) == 2
    assert "loss.fused_chunk_size" in capsys.readouterr().err


def test_cli_plans_a_token_budget_at_its_worst_case(capsys):
    """rollout.micro_batch_tokens: the plan counts the largest micro-batch the trainer's packer
    (trainer.batches.step_micro_batches) can make under the budget, and the most micro-batches
    per step, found here by packing a step of rows of every possible length."""
    from megatron_eaopd.rollout import RolloutBatch
    from megatron_eaopd.trainer.batches import step_micro_batches

    short = ["rollout.max_prompt_tokens=8", "rollout.max_response_tokens=40",
             "eval.max_response_tokens=40"]  # fmt: skip
    assert main(["--config", PAPER, *short, "--json"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    seq, cap, per_step = 48, 4, 16  # 32 prompts per step over DP 2, micro_batch_size 4
    assert fixed["batch"]["micro_batch"] == cap and fixed["batch"]["seq"] == seq

    def packed(width, budget, multiple=1):
        rows = torch.ones(per_step, dtype=torch.long)
        batch = RolloutBatch(
            tokens=torch.ones(per_step, width, dtype=torch.long), prompt_lens=rows,
            response_lens=rows * (width - 1), logprobs=torch.zeros(per_step, width),
            entropies=torch.zeros(per_step, width), finished=rows.bool(),
        )  # fmt: skip
        (micro,) = step_micro_batches(batch, 0, cap, max_tokens=budget, multiple=multiple)
        return max(mb["tokens"].numel() for mb in micro), len(micro)

    for budget in (48, 100, 130, 1 << 20):
        argv = ["--config", PAPER, *short, f"rollout.micro_batch_tokens={budget}"]
        assert main([*argv, "--json"]) == 0
        batch = json.loads(capsys.readouterr().out)["batch"]
        packs = [packed(w, budget) for w in range(1, seq + 1)]
        assert batch["micro_tokens"] == max(p for p, _ in packs)
        assert batch["micro_batches"] == max(c for _, c in packs)
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"at most rollout.micro_batch_tokens={budget} positions" in out
        assert f"= {batch['micro_tokens']} positions" in out
    # a budget that never binds plans what the fixed micro-batches do
    assert batch["micro_tokens"] == cap * seq
    assert main(["--config", PAPER, *short, "rollout.micro_batch_tokens=1048576", "--json"]) == 0
    unbound = json.loads(capsys.readouterr().out)
    assert unbound["variants"] == fixed["variants"]
    assert main(["--config", PAPER, "rollout.micro_batch_tokens=5000"]) == 2
    assert "rollout.micro_batch_tokens" in capsys.readouterr().err
    # sequence parallelism (the config's student tp 2): rows of 1-47 tokens are cut at even widths
    sp = ["rollout.max_prompt_tokens=8", "rollout.max_response_tokens=39",
          "eval.max_response_tokens=39", "parallel.sequence_parallel=true"]  # fmt: skip
    for budget in (48, 100, 141):
        assert main(["--config", PAPER, *sp, f"rollout.micro_batch_tokens={budget}", "--json"]) == 0
        batch = json.loads(capsys.readouterr().out)["batch"]
        packs = [packed(w, budget, multiple=2) for w in range(1, 48)]
        assert batch["micro_tokens"] == max(p for p, _ in packs), budget
        assert batch["micro_batches"] == max(c for _, c in packs), budget


def test_rows_that_fit_are_the_most_the_plan_fits(capsys):
    """The suggestion line: for each GPU the most rows at the limit per micro-batch (as a token
    budget) whose plan fits, no larger count fitting; and 4 rows at the limit as a budget plans
    exactly what the config's fixed 4-row micro-batches (the other code path) do."""
    from megatron_eaopd.plan.cli import load_plan_config, plan_config, rows_that_fit
    from megatron_eaopd.plan.memory import fits

    cfg, _ = load_plan_config(PAPER, [])
    fit = rows_that_fit(cfg, 8)
    assert fit["limit"] == 5120 and fit["rows_per_step"] == 16
    rows = fit["rows"]
    assert rows["A100-40GB"] < rows["A100/H100-80GB"] <= rows["H200-141GB"]

    def fitting(budget):
        trial, _ = load_plan_config(PAPER, [f"rollout.micro_batch_tokens={budget}",
                                            "rollout.micro_batch_size=16"])  # fmt: skip
        return fits(plan_config(trial, 8)["variants"]["fused"]["peak"])

    larger = [fitting(j * 5120) for j in range(1, 17)]
    for gpu, k in rows.items():
        assert k == 0 or larger[k - 1][gpu], gpu
        assert not any(f[gpu] for f in larger[k:]), gpu  # no larger count fits
    # 4 rows at the limit as a budget is planned as the config's fixed 4-row micro-batches
    assert cfg.rollout.micro_batch_size == 4 and cfg.rollout.micro_batch_tokens is None
    as_budget, _ = load_plan_config(PAPER, ["rollout.micro_batch_tokens=20480",
                                            "rollout.micro_batch_size=16"])  # fmt: skip
    assert plan_config(as_budget, 8)["variants"] == plan_config(cfg, 8)["variants"]
    assert main(["--config", PAPER]) == 0
    line = next(x for x in capsys.readouterr().out.split("\n") if x.startswith("most rows"))
    for gpu, k in rows.items():
        assert f"{gpu} {k}" in line and (k == 0 or f"micro_batch_tokens={k * 5120}" in line)


def test_cli_with_one_of_the_two_folders_downloaded(capsys, tmp_path):
    """The student folder on disk, the teacher's not yet: the teacher is planned from its preset
    and the config keeps the student folder's tokenizer (a task tokenizer next to an HF model is
    refused by the config checks)."""
    from tests.paper_configs import write_config

    student = write_config(str(tmp_path), "Qwen3-1.7B-Base")
    over = [f"model.student_hf={student}", f"model.teacher_hf={tmp_path}/absent/Qwen3-8B"]
    assert main(["--config", PAPER, *over]) == 0
    assert "preset qwen3-8b" in capsys.readouterr().out


@pytest.mark.parametrize("size, total", [("0.6b", 0.6e9), ("4b", 4.0e9)])
def test_cli_on_every_qwen3_config(capsys, size, total):
    """The 0.6B and 4B configs plan from presets before the download (they used to stop at
    'no preset matches'); the presets have the published sizes (Qwen3 0.6B / 4B, tied)."""
    from megatron_eaopd.config.hf_models import schema_shape
    from megatron_eaopd.models.config import PRESETS

    path = os.path.join(ROOT, "configs", f"qwen3-8b-to-{size}-1n8g-tp2pp2.yaml")
    assert main(["--config", path]) == 0
    assert f"preset qwen3-{size}" in capsys.readouterr().out
    m = schema_shape(PRESETS[f"qwen3-{size}"])
    shape = P.Shape(
        layers=m["layers"], hidden=m["hidden"], heads=m["heads"], query_groups=m["query_groups"],
        ffn_hidden=m["ffn_hidden"], vocab_size=m["vocab_size"], kv_channels=m["kv_channels"],
        tied=m["tied_embeddings"], qk_layernorm=m["qk_layernorm"],
    )  # fmt: skip
    assert P.stage_params(shape, P.Layout(1, 1), 0) == pytest.approx(total, rel=0.03)


def test_cli_refuses_bad_arguments_without_a_traceback(capsys):
    """Non-positive --world-size / --vocab-size (a ZeroDivisionError before), sequence
    parallelism at student TP 1 (check_run's rule): exit 2 naming the argument or key."""
    for args in (["--world-size", "0"], ["--world-size", "-8"], ["--vocab-size", "-3"]):
        with pytest.raises(SystemExit) as exc:
            main(["--config", PAPER, *args])
        assert exc.value.code == 2
        assert args[0] in capsys.readouterr().err
    sp = ["parallel.sequence_parallel=true"]
    assert main(["--config", PAPER, *sp, "parallel.student.tp=1"]) == 2
    assert "parallel.sequence_parallel" in capsys.readouterr().err
    assert main(["--config", PAPER, *sp]) == 0
    capsys.readouterr()
    base = os.path.join(ROOT, "configs", "base.yaml")  # the tokenizer's vocabulary (0)
    assert main(["--config", base]) == 2
    assert "model.student.vocab_size is 0" in capsys.readouterr().err
    assert main(["--config", base, "--vocab-size", "320", "--world-size", "2"]) == 0
    capsys.readouterr()


def _cli_json(capsys, *overrides):
    assert main(["--config", PAPER, "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_plans_the_exact_form_and_sequence_parallelism(capsys):
    """eaopd-plan on the paper config with the exact form / sequence parallelism: the numbers
    it prints are the planner's for that form and split, recomputed here from the shapes: the
    kept teacher tensors are the [rows, s, V_pad / tp] fp32 logits shard (logits) or the
    [rows, s, h_t] bf16 hidden states (fused) of the replica's rows; sequence parallelism lowers
    the student update by the norm terms' (tp - 1) / tp, layer by layer."""
    base = _cli_json(capsys)
    exact = _cli_json(capsys, "loss.objective=eopd_exact", "parallel.teacher.pp=1")
    assert exact["form"] == "exact" and base["form"] == "sampled"
    b = exact["batch"]
    positions = b["rows"] * b["seq"]
    fused, logits = (exact["variants"][k]["parts"] for k in ("fused", "logits"))
    assert fused[P.KEPT] == positions * 4096 * 2  # Qwen3-8B hidden, bf16
    assert logits[P.KEPT] == positions * (P.padded_vocab(151936, 2) // 2) * 4
    for v in ("fused", "logits"):  # in the update the kept tensors replace the payload
        got, want = (r["variants"][v]["parts"] for r in (exact, base))
        assert got["update"] - got[P.KEPT] == pytest.approx(want["update"] - want[P.KEPT])
    assert exact["variants"]["fused"]["comm"]["teacher payload (p2p)"] == 0
    sp = _cli_json(capsys, "parallel.sequence_parallel=true")
    assert sp["sequence_parallel"] and not base["sequence_parallel"]
    n = b["micro_batch"] * b["seq"]
    per_layer_norms = 2 * 2 * n * 2048 * 2  # te spec: two norms, input and output, bf16
    layers, in_flight = 28 // 2, min(2, b["micro_batches"])  # first stage of PP 2, 1F1B
    saved = per_layer_norms // 2 * (layers * in_flight + 1)  # + one layer's gradients
    for v in ("fused", "logits"):
        drop = base["variants"][v]["parts"]["update"] - sp["variants"][v]["parts"]["update"]
        assert drop == pytest.approx(saved)
        assert sp["variants"][v]["comm"] == base["variants"][v]["comm"]


def test_cli_distributed_optimizer_splits_the_optimizer_state_over_dp(capsys):
    """--distributed-optimizer (megatron's --use-distributed-optimizer, for the plugin in a user's
    own Megatron job): the student's optimizer state is the default's / DP; nothing else moves."""
    base = _cli_json(capsys)
    split = _cli_json(capsys, "--distributed-optimizer")
    assert split["distributed_optimizer"] and not base["distributed_optimizer"]
    dp = base["layouts"]["student"]["dp"]
    assert dp > 1
    key = "persistent: optimizer state"
    for v in ("fused", "logits"):
        got, want = split["variants"][v]["parts"], base["variants"][v]["parts"]
        assert got[key] == pytest.approx(want[key] / dp)
        assert {k: x for k, x in got.items() if k != key} == {
            k: x for k, x in want.items() if k != key
        }
    assert main(["--config", PAPER, "--distributed-optimizer"]) == 0
    assert "split over DP (distributed optimizer)" in capsys.readouterr().out
