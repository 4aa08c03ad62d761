"""Bad values are refused by the CLI with exit status 2, the key named, before any process group.

Each case runs ``megatron_eaopd.cli.main`` in this process on the tiny CPU config; a refusal must
come from the checks (``config.loader``, ``config.checks.check_run``, ``prepare_data``), so no
torch.distributed group may exist afterwards and no teacher is prepared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_eaopd import cli
from megatron_eaopd.config import ConfigError, check_run, load_config
from megatron_eaopd.config.checks import run_problems
from megatron_eaopd.data import answers, prepare
from tests.paper_configs import hf_overrides

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu-tp2.yaml"


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys):
    """main([...]) on the tiny config with caches and outputs under tmp_path; returns
    (exit status, stderr)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def run(*overrides, world_size=2):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        base = [
            f"tokenizer.cache_dir={tmp_path / 'tok'}",
            f"teacher_prep.cache_dir={tmp_path / 'teachers'}",
            f"student_prep.cache_dir={tmp_path / 'students'}",
            f"training.output_dir={tmp_path / 'run'}",
            "task.synthetic.num_train=200",
        ]
        rc = cli.main(["--config", str(TINY), *base, *overrides])
        err = capsys.readouterr().err
        assert not dist.is_initialized(), "a process group was created before the refusal"
        assert not (tmp_path / "teachers").exists(), "the teacher was prepared before the refusal"
        return rc, err

    return run


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["loss.top_k=100000"], "loss.top_k", ["<= the tokenizer's vocabulary"]),
        (["rollout.top_k=100000"], "rollout.top_k", ["vocabulary"]),
        (["loss.temperature=.inf"], "loss.temperature", ["finite", "> 0"]),
        (["optimizer.lr=.inf"], "optimizer.lr", ["finite", "> 0"]),
        (["optimizer.lr=.nan"], "optimizer.lr", ["finite"]),
        (["loss.fkl_coef=.inf"], "loss.fkl_coef", ["finite", ">= 0"]),
        (["eval.entropy_threshold=.inf"], "eval.entropy_threshold", ["finite", ">= 0"]),
        (["model.student.rope_base=-.inf"], "model.student.rope_base", ["finite", "> 0"]),
        (["loss.objective=jsd", "loss.jsd_beta=0"], "loss.jsd_beta", ["> 0"]),
        (["loss.objective=jsd", "loss.jsd_beta=1"], "loss.jsd_beta", ["< 1"]),
        (["rollout.temperature=0.7"], "loss.temperature", ["rollout.temperature=0.7"]),
        (["rollout.engine=auto"], "rollout.engine", ["removed"]),
        (
            ["parallel.sequence_parallel=true", "parallel.student.tp=1"],
            "parallel.sequence_parallel",
            ["parallel.student.tp=1", "> 1"],
        ),
        # the run's 30 iterations x 32 / 8 prompts = 120 optimizer steps
        (["optimizer.warmup_iterations=121"], "optimizer.warmup_iterations",
         ["121 exceeds the run's 120 optimizer steps", "training.iterations=30"]),
        (["model.student.ffn_hidden=385"], "parallel.student.tp",
         ["model.student.ffn_hidden=385 is not divisible by tp=2", "choose tp among [1]"]),
        (["model.teacher.ffn_hidden=385", "model.teacher.heads=8", "model.teacher.query_groups=8",
          "parallel.teacher.tp=4"], "parallel.teacher.tp", ["tp=4", "choose tp among [1]"]),
        (["model.student.vocab_size=20", "model.teacher.vocab_size=20"],
         "model.student.vocab_size", ["20 embedding rows are fewer than the tokenizer's"]),
        (["model.teacher.vocab_size=20"], "model.teacher.vocab_size",
         ["model.teacher.vocab_size=0 (the tokenizer's size) or at least"]),
        (["teacher_prep.iterations=0"], "teacher_prep.iterations", ["random", ">= 1"]),
        (["student_prep.iterations=0"], "student_prep.iterations",
         ["student_prep.enabled=false"]),
        (["task.eval_files=[/no/such/file.jsonl]"], "task.eval_files",
         ["not read by task.name=builtin", "task.name=jsonl"]),
        (["task.prompt_suffix=' Think.'"], "task.prompt_suffix", ["task.name=builtin"]),
        (["task.options={a: 1}"], "task.options", ["module:Class"]),
        (["training.iterations=0120"], "training.iterations", ["read as 80", "leading zero"]),
        (["logging.jsonl=false"], "logging.jsonl", ["eval.plot=false"]),
    ],
)  # fmt: skip
def test_cli_refuses_with_exit_2_and_the_key(run_cli, overrides, key, words):
    rc, err = run_cli(*overrides)
    assert rc == 2, err
    assert f"{key}:" in err, err
    line = next(x for x in err.splitlines() if f"{key}:" in x)
    for word in words:
        assert word in line, line


@pytest.mark.parametrize(
    "world_size, overrides, key",
    [
        (3, [], "parallel.student.tp"),  # tp 2 does not divide 3
        (6, ["parallel.teacher.tp=1", "parallel.teacher.pp=4"], "parallel.teacher.tp"),
    ],
)
def test_cli_refuses_a_world_size_tp_pp_does_not_divide(run_cli, world_size, overrides, key):
    rc, err = run_cli(*overrides, world_size=world_size)
    assert rc == 2, err
    line = next(x for x in err.splitlines() if f"{key}:" in x)
    assert f"world size {world_size}" in line and "must divide" in line, line


@pytest.mark.parametrize("key", ["output_dir", "checkpoint_dir", "export_hf"])
def test_cli_refuses_a_run_folder_that_cannot_be_written(run_cli, tmp_path, key):
    """Found at the start, not at the first save (with checkpoint_interval 0: after the run)."""
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "sub"
    rc, err = run_cli(f"training.{key}={folder}", "training.checkpoint_interval=0")
    assert rc == 2, err
    line = next(x for x in err.splitlines() if f"training.{key}={folder}" in x)
    assert "cannot be written" in line and "is not a folder" in line, line
    assert not folder.exists()


def test_cli_refuses_math_verify_when_missing(run_cli, monkeypatch):
    monkeypatch.setattr(answers, "math_verify_available", lambda: False)
    monkeypatch.setattr(prepare, "math_verify_available", lambda: False)
    rc, err = run_cli("eval.use_math_verify=true")
    assert rc == 2
    assert "eval.use_math_verify:" in err and "pip install math-verify" in err


def test_check_run_lists_every_problem_at_once():
    cfg = load_config(
        TINY,
        [
            "rollout.temperature=0.5",
            "parallel.sequence_parallel=true",
            "parallel.student.tp=1",
            "parallel.student.pp=2",
            "eval.use_math_verify=true",
            "eval.top_k=50",
        ],
    )
    with pytest.raises(ConfigError) as err:
        check_run(cfg, 3, vocab_size=40, cuda_available=True, math_verify_installed=False)
    keys = [k for k, _ in err.value.problems]
    assert keys == [
        "parallel.student.tp",
        "parallel.teacher.tp",
        "parallel.sequence_parallel",
        "parallel.backend",
        "loss.temperature",
        "eval.use_math_verify",
        "eval.top_k",
    ]
    sp = dict(err.value.problems)["parallel.sequence_parallel"]
    assert "parallel.student.tp=1" in sp


@pytest.mark.parametrize("cuda", [True, False])
def test_sequence_parallel_accepted_with_student_tp_2_on_gpu_and_cpu(tmp_path, cuda):
    """Sequence parallelism runs at student TP > 1 (tests/models/test_sequence_parallel.py), on
    CPU too: only student TP 1 is refused."""
    path = REPO / "configs" / "qwen3-8b-to-1.7b-1n8g-tp2pp2.yaml"
    cfg = load_config(path, ["parallel.sequence_parallel=true", *hf_overrides(path, str(tmp_path))])

    keys = [k for k, _ in run_problems(cfg, 8, cuda_available=cuda, math_verify_installed=True)]
    assert "parallel.sequence_parallel" not in keys
    check_run(load_config(TINY, ["parallel.sequence_parallel=true"]), 2, cuda_available=cuda)


def test_exact_form_allows_different_temperatures():
    """Only the sampled form's PPO ratio needs the sampling temperature."""
    cfg = load_config(TINY, ["loss.objective=eopd_exact", "rollout.temperature=0.7"])
    check_run(cfg, 2, vocab_size=182)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass_the_run_checks(path, tmp_path):
    cfg = load_config(path, hf_overrides(path, str(tmp_path)))
    cuda = cfg.parallel.backend != "gloo"
    world = 2 if path.name.startswith("tiny-cpu") else 8
    check_run(cfg, world, vocab_size=None if cuda else 182, cuda_available=cuda,
              math_verify_installed=True)  # fmt: skip


def test_top_k_bounded_by_a_fixed_model_vocabulary():
    cfg = load_config(TINY, ["loss.top_k=64", "model.teacher.vocab_size=32"])
    with pytest.raises(
        ConfigError, match=r"loss.top_k: out of range: 64 .*<= model.teacher.vocab_size, 32"
    ):
        check_run(cfg, 2)
    check_run(load_config(TINY, ["loss.top_k=64"]), 2)  # vocabulary unknown yet: no bound


def test_nccl_is_refused_without_cuda_and_auto_is_not():
    cfg = load_config(TINY, ["parallel.backend=nccl"])
    with pytest.raises(ConfigError, match="parallel.backend: nccl needs CUDA devices"):
        check_run(cfg, 2, cuda_available=False)
    check_run(cfg, 2, cuda_available=True)
    check_run(load_config(TINY, ["parallel.backend=auto"]), 2, cuda_available=False)


def test_gloo_on_gpus_is_refused_where_ranks_send_tensors():
    """gloo has no CUDA send / recv: pipeline stages or a teacher at another layout need nccl;
    the tiny config's gloo at one layout without PP runs on a GPU machine too."""
    tiny = REPO / "configs" / "tiny-cpu.yaml"  # gloo, TP 1 for both
    for extra in (["parallel.student.pp=2"], ["parallel.teacher.tp=2"]):
        cfg = load_config(tiny, extra)
        with pytest.raises(ConfigError, match="parallel.backend: gloo cannot send CUDA tensors"):
            check_run(cfg, 2, vocab_size=182, cuda_available=True)
        check_run(cfg, 2, vocab_size=182, cuda_available=False)
        auto = load_config(tiny, extra + ["parallel.backend=auto"])
        check_run(auto, 2, vocab_size=182, cuda_available=True)
    check_run(load_config(tiny), 2, vocab_size=182, cuda_available=True)
    # the export gathers a split student's blocks on rank 0 by send / recv
    split = load_config(TINY, ["training.export_hf=/tmp/out-hf"])  # TP 2 for both
    with pytest.raises(ConfigError, match="the export of a split student"):
        check_run(split, 2, cuda_available=True)
    check_run(load_config(TINY), 2, cuda_available=True)


def test_bf16_is_refused_on_gpus_before_ampere_and_names_each_model():
    cfg = load_config(TINY, ["model.student.dtype=bf16", "model.teacher.dtype=bf16"])
    v100 = ("Tesla V100-SXM2-32GB", 7, 0)
    problems = dict(run_problems(cfg, 2, cuda_available=True, gpu=v100))
    for who in ("student", "teacher"):
        text = problems[f"model.{who}.dtype"]
        assert "V100-SXM2-32GB is 7.0" in text and f"model.{who}.dtype=fp16" in text
    only_teacher = load_config(TINY, ["model.teacher.dtype=bf16"])
    t4 = ("Tesla T4", 7, 5)
    with pytest.raises(ConfigError, match=r"model.teacher.dtype: bf16 needs .* T4 is 7.5"):
        check_run(only_teacher, 2, cuda_available=True, gpu=t4)
    check_run(cfg, 2, cuda_available=True, gpu=("NVIDIA A100-SXM4-80GB", 8, 0))
    loaded = load_config(TINY, ["model.teacher.dtype=bf16", "model.teacher_checkpoint=/ckpt"])
    check_run(loaded, 2, cuda_available=False, gpu=t4)  # the CPU runs bf16 natively
    check_run(load_config(TINY, ["model.teacher.dtype=fp16"]), 2, cuda_available=True, gpu=t4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_teacher_that_teacher_prep_trains_is_refused_on_cpu(dtype):
    """teacher_prep trains the teacher with megatron's optimizer, which keeps fp32 main
    weights only for CUDA tensors: on CPU it failed after the data preparation with a
    TypeError from get_megatron_optimizer. A loaded teacher may be half precision on CPU."""
    cfg = load_config(TINY, [f"model.teacher.dtype={dtype}"])
    with pytest.raises(ConfigError, match=rf"model.teacher.dtype: {dtype} needs CUDA here: "
                       r"teacher_prep.enabled trains .* model.teacher.dtype=fp32"):  # fmt: skip
        check_run(cfg, 2, cuda_available=False)
    if dtype == "fp16":
        check_run(cfg, 2, cuda_available=True, gpu=("Tesla T4", 7, 5))
    loaded = load_config(TINY, [f"model.teacher.dtype={dtype}", "model.teacher_checkpoint=/c"])
    check_run(loaded, 2, cuda_available=False)


def test_the_bf16_check_reads_this_process_gpu(monkeypatch):
    """Before torch.cuda.set_device every rank's current device is 0: the check reads the
    launcher's LOCAL_RANK device (a node may mix cards; and GPU 0 is not touched by all)."""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: asked.append(i) or f"gpu{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 0) if i == 2 else (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    cfg = load_config(TINY, ["model.teacher.dtype=bf16"])
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert "gpu2 is 7.0" in dict(run_problems(cfg, 2, cuda_available=True))["model.teacher.dtype"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert "model.teacher.dtype" not in dict(run_problems(cfg, 2, cuda_available=True))
    assert asked == [2, 1]


def test_more_processes_on_a_node_than_gpus_are_refused(monkeypatch):
    """LOCAL_RANK 8 on an 8-GPU node took GPU 8 % 8 = 0: two ranks shared a GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    cfg = load_config(TINY, [])
    monkeypatch.setenv("LOCAL_RANK", "8")
    h100 = ("H100", 9, 0)
    problem = dict(run_problems(cfg, 16, cuda_available=True, gpu=h100)).get("LOCAL_RANK", "")
    assert "8, but this node shows 8 GPUs" in problem and "--nproc-per-node" in problem
    monkeypatch.setenv("LOCAL_RANK", "7")
    assert "LOCAL_RANK" not in dict(run_problems(cfg, 16, cuda_available=True, gpu=h100))
    monkeypatch.setenv("LOCAL_RANK", "8")  # a CPU run (gloo, fp32): no GPU is taken
    assert "LOCAL_RANK" not in dict(run_problems(cfg, 16, cuda_available=False))
    # not told (an fp32 run on GPUs: check_run leaves cuda_available unset): torch is asked
    assert "LOCAL_RANK" in dict(run_problems(cfg, 16, gpu=h100))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1
    assert "LOCAL_RANK" not in dict(run_problems(cfg, 16, cuda_available=True, gpu=h100))
