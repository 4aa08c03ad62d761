"""Static and dry-run checks of the launch scripts; no Slurm needed (shellcheck is installed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    [
        *ROOT.glob("launch/*.sh"),
        *ROOT.glob("launch/slurm/*.sh"),
        *ROOT.glob("launch/slurm/*.sbatch"),
    ]
)
SBATCH = sorted(ROOT.glob("launch/slurm/*.sbatch"))
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def test_scripts_exist():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {
        "launch/run_local.sh",
        "launch/common.sh",
        "launch/slurm/lib.sh",
        "launch/slurm/torchrun_node.sh",
        "launch/slurm/task.sh",
        "launch/slurm/eaopd_torchrun.sbatch",
        "launch/slurm/eaopd_per_gpu.sbatch",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _ensure_shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "shellcheck"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    found = shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck is missing: apt-get install -y shellcheck", pytrace=False)
    return found


def test_shellcheck_clean():
    shellcheck = _ensure_shellcheck()
    result = subprocess.run(
        [shellcheck, "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_executable_bits():
    for script in SCRIPTS:
        if script.name != "common.sh" and script.name != "lib.sh":
            assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_headers(script):
    text = script.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    for expected in ("--account=CHANGE_ME", "--partition=CHANGE_ME", "--requeue"):
        assert expected in directives, expected
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)
    assert "--open-mode=append" in directives  # requeued attempts append to the same log
    assert any(d.startswith("--time=") for d in directives)
    assert "--exclusive" in directives and "--mem=0" in directives  # all of each node's memory
    assert "\nset -euo pipefail\n" in text
    # Directives must come before the first command, or sbatch ignores them.
    first_command = text.index("\nset -euo pipefail")
    assert text.rindex("#SBATCH") < first_command


def _fake_bin(tmp_path: Path) -> Path:
    """A fake scontrol answering `show job` (Command=) and `show hostnames`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        "#!/bin/bash\n"
        'case "$1 $2" in\n'
        f'  "show job") echo "   Command={ROOT}/launch/slurm/eaopd_per_gpu.sbatch" ;;\n'
        '  "show hostnames") printf "gpu-node-017\\ngpu-node-018\\n" ;;\n'
        "esac\n"
    )
    scontrol.chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EAOPD_"))}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.update(
        PATH=f"{_fake_bin(tmp_path)}:{env['PATH']}",
        SLURM_JOB_ID="123",
        SLURM_JOB_NAME="eaopd",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu-node-[017-018]",
        SLURM_NTASKS="16",
        SLURM_CPUS_PER_TASK="8",
        SLURM_SUBMIT_DIR=str(tmp_path),
        EAOPD_LOG_ROOT=str(tmp_path / "logs"),
        EAOPD_DRY_RUN="1",
    )
    env.update(extra)
    return env


def _dry_run(script: Path, env: dict[str, str], *args: str) -> list[str]:
    # Run a copy from elsewhere, as Slurm does (it runs the script from its spool folder).
    copy = Path(env["SLURM_SUBMIT_DIR"]) / "spool-copy.sbatch"
    shutil.copy(script, copy)
    result = subprocess.run(
        ["bash", str(copy), *args],
        env=env,
        cwd=env["SLURM_SUBMIT_DIR"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


def test_per_gpu_dry_run_builds_the_srun_command(tmp_path):
    env = _slurm_env(
        tmp_path,
        EAOPD_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3",
        EAOPD_CONTAINER_MOUNTS="/data:/data,/ckpt:/ckpt",
        EAOPD_SRUN_ARGS="--mpi=none --network=sn_all",
    )
    cmd = _dry_run(SBATCH[0].parent / "eaopd_per_gpu.sbatch", env, str(CONFIG), "a.b=1")
    assert cmd[0] == "srun"
    assert "--ntasks=16" in cmd and "--cpus-per-task=8" in cmd and "--label" in cmd
    assert "--export=ALL" in cmd and "--kill-on-bad-exit=1" in cmd
    assert f"--output={tmp_path}/logs/eaopd-123/attempt0-node%n.log" in cmd
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in cmd
    # EAOPD_CONTAINER_MOUNTS adds to the repository and the submit folder, never replaces them.
    assert f"--container-mounts={ROOT}:{ROOT},{tmp_path}:{tmp_path},/data:/data,/ckpt:/ckpt" in cmd
    assert f"--container-workdir={tmp_path}" in cmd  # the submit folder, as without a container
    assert "--mpi=none" in cmd and "--network=sn_all" in cmd
    assert cmd[-4:] == ["bash", f"{ROOT}/launch/slurm/task.sh", str(CONFIG), "a.b=1"]


def test_torchrun_dry_run_uses_one_task_per_node(tmp_path):
    env = _slurm_env(
        tmp_path,
        SLURM_RESTART_COUNT="2",
        EAOPD_CONTAINER_IMAGE="img.sqsh",
        SLURM_GPUS_PER_NODE="h100:8",
    )
    env.pop("SLURM_CPUS_PER_TASK")
    env["SLURM_CPUS_ON_NODE"] = "96"
    cmd = _dry_run(SBATCH[0].parent / "eaopd_torchrun.sbatch", env, str(CONFIG))
    assert "--nodes=2" in cmd and "--ntasks=2" in cmd and "--ntasks-per-node=1" in cmd
    assert "--cpus-per-task=96" in cmd
    assert f"--output={tmp_path}/logs/eaopd-123/attempt2-node%n.log" in cmd
    # Without EAOPD_CONTAINER_MOUNTS the repository and the submit folder keep their paths.
    assert f"--container-mounts={ROOT}:{ROOT},{tmp_path}:{tmp_path}" in cmd
    assert cmd[-3:] == ["bash", f"{ROOT}/launch/slurm/torchrun_node.sh", str(CONFIG)]


def test_torchrun_gives_every_node_the_smallest_nodes_cpus(tmp_path):
    """--cpus-per-task is one value for every node of the step; SLURM_CPUS_ON_NODE is the batch
    node's only. On nodes of 112 and 96 CPUs a step asking 112 per task cannot be created."""
    env = _slurm_env(tmp_path, SLURM_GPUS_PER_NODE="8")
    env.pop("SLURM_CPUS_PER_TASK")
    env.update(SLURM_CPUS_ON_NODE="112", SLURM_JOB_CPUS_PER_NODE="112,96")
    cmd = _dry_run(SBATCH[0].parent / "eaopd_torchrun.sbatch", env, str(CONFIG))
    assert "--cpus-per-task=96" in cmd, cmd


@pytest.mark.parametrize("name", ["eaopd_per_gpu.sbatch", "eaopd_torchrun.sbatch"])
def test_the_repository_is_found_when_its_path_holds_spaces(tmp_path, name):
    """scontrol's Command= is the submitted path and its arguments, space-separated: the path
    was cut at its first space and the job failed with "cannot find the repository"."""
    repo = tmp_path / "my repo"
    (repo / "launch" / "slurm").mkdir(parents=True)
    for f in (ROOT / "launch" / "slurm").iterdir():
        (repo / "launch" / "slurm" / f.name).symlink_to(f)
    (repo / "launch" / "common.sh").symlink_to(ROOT / "launch" / "common.sh")
    submit = tmp_path / "submit"
    submit.mkdir()
    env = _slurm_env(submit, CDPATH=str(tmp_path))  # CDPATH must not leak into $(cd ... && pwd)
    if "torchrun" in name:
        env.pop("SLURM_CPUS_PER_TASK")
        env.update(SLURM_CPUS_ON_NODE="8", SLURM_GPUS_PER_NODE="8")
    (Path(env["PATH"].split(":")[0]) / "scontrol").write_text(
        "#!/bin/bash\n"
        'case "$1 $2" in\n'
        f'  "show job") echo "   Command={repo}/launch/slurm/{name} {CONFIG} a.b=1" ;;\n'
        '  "show hostnames") printf "gpu-node-017\\ngpu-node-018\\n" ;;\n'
        "esac\n"
    )
    cmd = _dry_run(SBATCH[0].parent / name, env, str(CONFIG), "a.b=1")
    script = "task.sh" if "per_gpu" in name else "torchrun_node.sh"
    assert f"{repo}/launch/slurm/{script}" in cmd, cmd


def test_config_is_required_and_must_exist(tmp_path):
    script = SBATCH[0].parent / "eaopd_per_gpu.sbatch"
    env = _slurm_env(tmp_path)
    for args, message in (([], "no config"), (["missing.yaml"], "config file not found")):
        result = subprocess.run(
            ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0 and message in result.stderr


def test_config_from_environment_with_overrides_only(tmp_path):
    env = _slurm_env(tmp_path, EAOPD_CONFIG=str(CONFIG))
    cmd = _dry_run(SBATCH[0].parent / "eaopd_per_gpu.sbatch", env, "x.y=2", "z=3")
    assert cmd[-4:] == [f"{ROOT}/launch/slurm/task.sh", str(CONFIG), "x.y=2", "z=3"]


def test_config_given_as_the_trainers_flag_or_in_a_folder_named_with_an_equals_sign(tmp_path):
    """`--config FILE` (the trainer's form, which the docs call the same arguments) was taken
    for a missing file named --config; a config under lr=1e-4/ was taken for an override."""
    odd = tmp_path / "lr=1e-4" / "tiny.yaml"
    odd.parent.mkdir()
    odd.write_text(CONFIG.read_text())
    script = SBATCH[0].parent / "eaopd_per_gpu.sbatch"
    env = _slurm_env(tmp_path)
    task = f"{ROOT}/launch/slurm/task.sh"
    for args, config in ((["--config", str(CONFIG)], CONFIG), ([f"--config={CONFIG}"], CONFIG),
                         ([str(odd)], odd)):  # fmt: skip
        cmd = _dry_run(script, env, *args, "x.y=2")
        assert cmd[-3:] == [task, str(config), "x.y=2"], (args, cmd)
    env["EAOPD_CONFIG"] = str(CONFIG)
    cmd = _dry_run(script, env, str(odd))  # a first argument that is a file: the config
    assert cmd[-2:] == [task, str(odd)], cmd
    cmd = _dry_run(script, env, "task.eval_files=extra.yaml")  # an override naming a file
    assert cmd[-2:] == [str(CONFIG), "task.eval_files=extra.yaml"], cmd


def _fake_python(tmp_path: Path) -> Path:
    """A 'python' that prints its torch-relevant environment and arguments."""
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/bin/bash\n"
        'echo "RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK '
        'LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE GROUP_RANK=$GROUP_RANK OMP=$OMP_NUM_THREADS"\n'
        'echo "ARGS $*"\n'
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize(
    ("tasks_per_node", "node_id", "expected_local"),
    [("4(x2)", "1", "4"), ("8,7", "1", "7"), ("3,2(x3)", "3", "2"), ("8(x4)", "0", "8")],
)
def test_task_maps_slurm_ids_to_torch_env(tmp_path, tasks_per_node, node_id, expected_local):
    env = _slurm_env(
        tmp_path,
        SLURM_PROCID="5",
        SLURM_NTASKS="8",
        SLURM_LOCALID="1",
        SLURM_NODEID=node_id,
        SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
        SLURM_CPUS_PER_TASK="6",
        MASTER_ADDR="n1",
        MASTER_PORT="1234",
        EAOPD_ROOT=str(ROOT),
        EAOPD_PYTHON=str(_fake_python(tmp_path)),
        EAOPD_ENTRY="megatron_eaopd.cli",
    )
    env.pop("EAOPD_DRY_RUN")
    result = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/task.sh"), str(CONFIG), "k=v"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"RANK=5 WORLD_SIZE=8 LOCAL_RANK=1 LOCAL_WORLD_SIZE={expected_local} "
        f"GROUP_RANK={node_id} OMP=6"
    )
    assert lines[1] == f"ARGS -m megatron_eaopd.cli --config {CONFIG} k=v"


def test_run_local_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAOPD_")}
    env.update(EAOPD_DRY_RUN="1", EAOPD_NPROC_PER_NODE="4", EAOPD_PYTHON="python3")
    result = subprocess.run(
        [str(ROOT / "launch/run_local.sh"), str(CONFIG), "training.iterations=3"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout.strip())
    assert cmd[:3] == ["python3", "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[-5:] == [
        "-m",
        "megatron_eaopd.cli",
        "--config",
        str(CONFIG),
        "training.iterations=3",
    ]


def test_run_local_runs_the_standin_on_two_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EAOPD_", "SLURM_"))}
    env.update(
        EAOPD_NPROC_PER_NODE="2",
        EAOPD_ENTRY="tests.launch.standin_trainer",
        EAOPD_PYTHON=sys.executable,
    )
    result = subprocess.run(
        [
            str(ROOT / "launch/run_local.sh"),
            str(CONFIG),
            f"training.output_dir={tmp_path}",
            "training.iterations=3",
            "training.checkpoint_dir=null",
            "standin.step_seconds=0",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("iteration ")]
    assert lines == [f"iteration {i}/3 | loss {3.0 * i:.4f} | world 2" for i in (1, 2, 3)]
    assert '"iteration": 3' in (tmp_path / "checkpoints" / "latest.json").read_text()


def _run_local(tmp_path: Path, *overrides: str, entry="tests.launch.standin_trainer", **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EAOPD_", "SLURM_"))}
    env.update(EAOPD_NPROC_PER_NODE="2", EAOPD_ENTRY=entry, EAOPD_PYTHON=sys.executable, **extra)
    args = [str(ROOT / "launch/run_local.sh"), str(CONFIG), f"training.output_dir={tmp_path}",
            "training.checkpoint_dir=null", *overrides]  # fmt: skip
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_run_local_stops_with_a_checkpoint_on_sigterm_and_says_so_in_its_status(tmp_path):
    """run_local.sh exec'd torchrun with the preemption signals ignored: `kill <pid>` (a
    container stop, a supervisor) did nothing and the run went to its end; a stopped run exited
    0 like a finished one, a configuration error 1 (torchrun's)."""
    proc = _run_local(tmp_path, "training.iterations=500", "standin.step_seconds=0.05")
    seen = _until_iteration(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = "".join(seen) + out
    assert proc.returncode == 75, out
    assert "standin: preempted" in out and "run the same command again to resume" in out
    saved = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["iteration"]
    assert 0 < saved < 500, out
    bad = _run_local(tmp_path / "bad", "no_such.key=1", entry="megatron_eaopd.cli")
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2 and out.count("eaopd-train: invalid configuration") == 1, out


def _until_iteration(proc, n: int) -> list[str]:
    seen = []
    for line in proc.stdout:  # until the workers run (their handlers installed)
        seen.append(line)
        if line.startswith(f"iteration {n}/"):
            break
    return seen


def test_run_local_leaves_no_training_behind_when_it_dies_of_another_signal(tmp_path):
    """SIGTERM when only USR1 is a preemption signal killed the script alone: torchrun and its
    workers trained on, orphaned, to the run's end. Now torchrun gets it and stops them."""
    proc = _run_local(tmp_path, "training.iterations=500", "standin.step_seconds=0.05",
                      EAOPD_PREEMPT_SIGNALS="USR1")  # fmt: skip
    _until_iteration(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode not in (0, 75), out
    time.sleep(1.0)
    mark = f"training.output_dir={tmp_path}".encode()
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if mark in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:
            continue  # ended meanwhile
    assert left == [], out
    assert "iteration 500/500" not in out
