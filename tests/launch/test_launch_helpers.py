"""The launchers' helper functions (launch/common.sh, launch/slurm/lib.sh) and the trainer's side
of the protocol with them (stop file, exit status files), checked without Slurm."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eaopd import cli
from megatron_eaopd.trainer import loop
from megatron_eaopd.trainer.preemption import (
    EXIT_CONFIG,
    EXIT_STOPPED,
    PreemptionHandler,
    write_exit_status,
)
from tests.launch.jobs import CANCELLED, REQUEUED_BY_SLURM, SHOW_JOB

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
BASH = shutil.which("bash") or "/bin/bash"


def bash(snippet: str, env: dict[str, str] | None = None, path: str | None = None, stdin=""):
    """Run `snippet` in bash after sourcing launch/slurm/lib.sh (which sources common.sh)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EAOPD_"))}
    clean.pop("CUDA_VISIBLE_DEVICES", None)
    clean.update(EAOPD_ROOT=str(ROOT), **(env or {}))
    if path is not None:
        clean["PATH"] = path
    return subprocess.run(
        [BASH, "-c", f'set -euo pipefail; source "$EAOPD_ROOT/launch/slurm/lib.sh"; {snippet}'],
        env=clean,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _bin(tmp_path: Path, nvidia_smi: str | None) -> str:
    """A PATH with date, grep and, if given, a fake nvidia-smi (a shell script body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("date", "grep", "cat"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True)
        (bin_dir / tool).symlink_to(found.stdout.strip())
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/bash\n{nvidia_smi}\n")
        fake.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EAOPD_NPROC_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
        ({"SLURM_JOB_ID": "1", "SLURM_GPUS_PER_NODE": "a100:4,v100:2"}, "6"),
        ({"SLURM_JOB_ID": "1", "SLURM_GPUS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "4"}, "8"),
        ({"SLURM_JOB_ID": "1", "SLURM_GPUS_PER_NODE": "0", "SLURM_GPUS_ON_NODE": "4"}, "4"),
        ({"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0,2,5"}, "3"),
        ({"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0,1,-1,3"}, "2"),  # CUDA stops at -1
        ({"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "GPU-8f2a-11,GPU-9a2a-22"}, "2"),  # UUIDs
    ],
)
def test_processes_per_node_come_from_the_allocation(env, expected):
    result = bash("eaopd_nproc_per_node", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EAOPD_NPROC_PER_NODE": "two"}, "EAOPD_NPROC_PER_NODE=two is not a positive integer"),
        ({"SLURM_JOB_ID": "1", "SLURM_GPUS_PER_NODE": "0"}, "set EAOPD_NPROC_PER_NODE=N"),
        ({"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": ""}, "the job has no GPUs"),
    ],
)
def test_processes_per_node_refused_when_unknown(env, message):
    result = bash('n=$(eaopd_nproc_per_node); echo "got $n"', env)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "got" not in result.stdout


def test_processes_per_node_outside_slurm_from_nvidia_smi(tmp_path):
    two = 'echo "GPU 0: H100 (UUID: a)"; echo "GPU 1: H100 (UUID: b)"'
    result = bash("eaopd_nproc_per_node", path=_bin(tmp_path, two))
    assert (result.returncode, result.stdout.strip()) == (0, "2"), result.stderr


def test_failing_nvidia_smi_is_an_error_not_one_process(tmp_path):
    broken = 'echo "NVIDIA-SMI has failed: driver mismatch" >&2; exit 9'
    result = bash('n=$(eaopd_nproc_per_node); echo "got $n"', path=_bin(tmp_path, broken))
    assert result.returncode == 2 and "got" not in result.stdout
    assert "nvidia-smi failed" in result.stderr and "driver mismatch" in result.stderr


@pytest.mark.parametrize("hidden", ["", "-1", "NoDevFiles"])
def test_gpus_hidden_by_cuda_visible_devices_outside_slurm_are_one_process(tmp_path, hidden):
    """An empty CUDA_VISIBLE_DEVICES started one process per GPU nvidia-smi listed (8), "-1"
    counted as one GPU: both hide every GPU from CUDA."""
    eight = 'for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: H100 (UUID: $i)"; done'
    env = {"CUDA_VISIBLE_DEVICES": hidden}
    result = bash("eaopd_nproc_per_node", env, path=_bin(tmp_path, eight))
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    assert "hides every GPU" in result.stderr


def test_no_nvidia_smi_outside_slurm_is_one_process_and_says_so(tmp_path):
    result = bash("eaopd_nproc_per_node", path=_bin(tmp_path, None))
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    assert "no nvidia-smi" in result.stderr


def test_master_port_avoids_the_ephemeral_range():
    ports = bash(
        "for j in 1 77 12345 999999; do for a in 0 1 2; do "
        "eaopd_master_port $j $a 32768 60999; done; done"
    )
    values = [int(p) for p in ports.stdout.split()]
    assert len(values) == 12 and all(10000 <= p < 32768 for p in values), values
    assert len(set(values)) > 6  # spread over the range, moves with the attempt
    high = bash("eaopd_master_port 5 0 1024 40000").stdout.strip()
    assert 40000 < int(high) <= 65535
    full = bash("eaopd_master_port 5 0 1024 65500")
    assert full.returncode == 2 and "set EAOPD_MASTER_PORT" in full.stderr
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    here = int(bash("eaopd_master_port 4242 3").stdout)
    assert not low <= here <= high


def test_preemption_signals_are_configurable_and_kept_from_torchrun():
    result = bash(
        "eaopd_preempt_signals; eaopd_torchrun_signals USR1 TERM; "
        'echo "torchrun=$TORCHELASTIC_SIGNALS_TO_HANDLE pet=$PET_SIGNALS_TO_HANDLE"',
        {"EAOPD_PREEMPT_SIGNALS": "usr1, SIGTERM"},
    )
    assert result.stdout.split() == [
        "USR1",
        "TERM",
        "torchrun=SIGINT,SIGHUP,SIGQUIT",
        "pet=SIGINT,SIGHUP,SIGQUIT",
    ]
    assert bash("eaopd_preempt_signals").stdout.split() == ["USR1", "TERM"]  # the default
    # numbers (the trainer takes them) were passed on as "10", which the scripts compare with
    # names: torchrun went on handling SIGTERM (killing the workers before their save)
    numbers = bash("eaopd_preempt_signals", {"EAOPD_PREEMPT_SIGNALS": "10,15"})
    assert numbers.stdout.split() == ["USR1", "TERM"], numbers.stderr
    bad = bash("s=$(eaopd_preempt_signals)", {"EAOPD_PREEMPT_SIGNALS": "USR1,NOPE"})
    assert bad.returncode == 2 and "unknown signal 'NOPE'" in bad.stderr


def test_prefix_filter_labels_every_line_once():
    result = bash('eaopd_prefix_lines "node1: "', stdin="0: a\nW torchrun says\n12: b\nlast")
    assert result.stdout.splitlines() == ["0: a", "node1: W torchrun says", "12: b", "node1: last"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"rank0": "stopped 0 7", "rank1": "stopped 0 7"}, "stopped"),
        ({"rank0": "finished 0 12", "rank1": "finished 0 12"}, "finished"),
        ({"rank0": "config_error 2", "rank1": "config_error 2"}, "config_error"),
        ({}, ""),
    ],
)
def test_batch_script_reads_the_trainer_status(tmp_path, files, expected):
    for name, line in files.items():
        (tmp_path / name).write_text(line + "\n")
    result = bash("eaopd_trainer_status", {"EAOPD_STATUS_DIR": str(tmp_path)})
    assert result.stdout.strip() == expected, result.stderr


def test_stop_file_stops_like_a_signal(tmp_path):
    stop = tmp_path / "stop-attempt0"
    handler = PreemptionHandler(signals="USR2", stop_file=stop)
    assert not handler.should_stop() and handler.reason is None
    stop.touch()
    assert handler.should_stop() and handler.received
    assert handler.reason == f"stop file {stop}" and handler.seconds_since_signal >= 0


def test_stop_file_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EAOPD_STOP_FILE", str(tmp_path / "stop"))
    monkeypatch.delenv("EAOPD_PREEMPT_SIGNALS", raising=False)
    handler = PreemptionHandler()
    assert handler.stop_file == str(tmp_path / "stop")
    assert handler.signals == (signal.SIGUSR1, signal.SIGTERM)


def test_exit_status_file(tmp_path, monkeypatch):
    monkeypatch.delenv("EAOPD_STATUS_DIR", raising=False)
    assert write_exit_status("finished", 0) is None  # not under the batch scripts
    path = write_exit_status("stopped", 0, 7, directory=tmp_path / "s", rank=3)
    assert Path(path).read_text() == "stopped 0 7\n" and path.endswith("rank3")
    with pytest.raises(ValueError, match="unknown exit status"):
        write_exit_status("paused", 0)
    assert (EXIT_CONFIG, EXIT_STOPPED) == (2, 75)


def test_trainer_records_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EAOPD_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["--config", str(CONFIG), "no_such.key=1"]) == 2
    assert (tmp_path / "rank1").read_text() == "config_error 2\n"


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert loop._on_terminal() is False

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    assert loop._on_terminal() is True


def test_handler_ignores_late_signals_after_the_run():
    """uninstall(ignore=True): a late copy of the signal (Slurm fans it out, the launcher
    forwards another) cannot kill a process that is exiting after its save."""
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        handler = PreemptionHandler(signals="USR2").install()
        handler.uninstall(ignore=True)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR2)  # ignored: the test process lives on
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _slow_date_path(tmp_path: Path) -> str:
    """PATH with a `date` that takes 0.3 s: a launcher's trap (it logs) outlasts a step that
    ends at once on the signal, as a step that is already exiting does."""
    bin_dir = tmp_path / "slowbin"
    bin_dir.mkdir()
    real = shutil.which("date")
    (bin_dir / "date").write_text(f'#!/bin/bash\nsleep 0.3\nexec {real} "$@"\n')
    (bin_dir / "date").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _signal_when_ready(proc: subprocess.Popen, ready: Path, sig: int) -> tuple[int, str]:
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


# A step that ends as soon as it is signalled, writing its status ("stopped" or "finished").
STEP = """
import os, signal, sys, time
def stop(*_):
    with open(os.path.join(os.environ["EAOPD_STATUS_DIR"], "rank0"), "w") as f:
        f.write(sys.argv[1] + " 0 3\\n")
    os._exit(0)
signal.signal(signal.SIGUSR1, stop)
open(os.environ["READY"], "w").close()
time.sleep(30)
"""


@pytest.mark.parametrize(("status", "expected"), [("stopped", 75), ("finished", 0)])
def test_batch_script_takes_the_step_status_when_the_step_ends_during_the_trap(
    tmp_path, status, expected
):
    """The signal's trap interrupts `wait` (status 138); if srun ends while the trap runs, the
    batch script must still exit with srun's status and the trainer's verdict, not 138."""
    (tmp_path / "step.py").write_text(STEP)
    snippet = (
        "eaopd_write_launch_record() { :; }; "
        "EAOPD_SIGNAL_LIST=(USR1 TERM); EAOPD_PREEMPT_SIGNALS=USR1,TERM; EAOPD_SIGNALLED=''; "
        "EAOPD_JOB_KEY=1; EAOPD_ATTEMPT=0; EAOPD_LOG_DIR=$T; EAOPD_STOP_FILE=$T/stop; "
        "export EAOPD_STATUS_DIR=$T/status; mkdir -p $EAOPD_STATUS_DIR; "
        f'eaopd_run_step "{sys.executable}" "$T/step.py" {status}'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EAOPD_"))}
    env.update(
        EAOPD_ROOT=str(ROOT), EAOPD_REQUEUE="0", T=str(tmp_path), READY=str(tmp_path / "ready"),
        PATH=_slow_date_path(tmp_path), EAOPD_FORWARD_AFTER="0",
    )  # fmt: skip
    proc = subprocess.Popen(
        [BASH, "-c", f'set -euo pipefail; source "$EAOPD_ROOT/launch/slurm/lib.sh"; {snippet}'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    rc, out = _signal_when_ready(proc, tmp_path / "ready", signal.SIGUSR1)
    assert f"exited with status 0; trainer status: {status}" in out, out
    assert rc == expected, out


def _write_stop_file_step(path, seconds: int, ready: bool = False) -> None:
    """A stand-in training step: (touches $READY,) waits up to ``seconds`` for the stop file and
    writes its rank-0 status, stopped if the file came, else finished."""
    path.write_text(
        "import os, time\n"
        + ("open(os.environ['READY'], 'w').close()\n" if ready else "")
        + f"stop, end = os.environ['EAOPD_STOP_FILE'], time.monotonic() + {seconds}\n"
        "while not os.path.exists(stop) and time.monotonic() < end: time.sleep(0.02)\n"
        "status = 'stopped' if os.path.exists(stop) else 'finished'\n"
        "with open(os.path.join(os.environ['EAOPD_STATUS_DIR'], 'rank0'), 'w') as f:\n"
        "    f.write(status + ' 0 1\\n')\n"
    )


def test_the_time_limit_warning_stops_a_run_whose_signals_leave_out_usr1(tmp_path):
    """The sbatch scripts ask Slurm for USR1 300 s before the time limit; with
    EAOPD_PREEMPT_SIGNALS=TERM the batch shell did not trap it and died (FAILED, no requeue, the
    save cut short). Now USR1 writes the stop file and is not forwarded (the trainer, not
    catching it, would die): the step stops at its next poll and the run counts as stopped."""
    _write_stop_file_step(tmp_path / "step.py", seconds=20, ready=True)
    snippet = (
        "eaopd_write_launch_record() { :; }; "
        "EAOPD_SIGNAL_LIST=(TERM); EAOPD_PREEMPT_SIGNALS=TERM; EAOPD_SIGNALLED=''; "
        "EAOPD_JOB_KEY=1; EAOPD_ATTEMPT=0; EAOPD_LOG_DIR=$T; export EAOPD_STOP_FILE=$T/stop; "
        "export EAOPD_STATUS_DIR=$T/status; mkdir -p $EAOPD_STATUS_DIR; "
        f'eaopd_run_step "{sys.executable}" "$T/step.py"'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EAOPD_"))}
    env.update(
        EAOPD_ROOT=str(ROOT), EAOPD_REQUEUE="0", T=str(tmp_path), READY=str(tmp_path / "ready"),
        EAOPD_FORWARD_AFTER="0",
    )  # fmt: skip
    proc = subprocess.Popen(
        [BASH, "-c", f'set -euo pipefail; source "$EAOPD_ROOT/launch/slurm/lib.sh"; {snippet}'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    rc, out = _signal_when_ready(proc, tmp_path / "ready", signal.SIGUSR1)
    assert "caught SIGUSR1: wrote the stop file; forwarded no signal" in out, out
    assert "exited with status 0; trainer status: stopped" in out, out
    assert rc == 75, out


def test_node_script_takes_torchrun_status_when_it_ends_during_the_trap(tmp_path):
    """As above for torchrun_node.sh: torchrun (here a stand-in that ends 0 once the stop file
    exists) ends while the node script's trap runs; the node script exits 0, not 143."""
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/bin/bash\n"
        ': >"$READY"\n'
        f"exec {sys.executable} -c '\n"
        "import os, time\n"
        'while not os.path.exists(os.environ["EAOPD_STOP_FILE"]): time.sleep(0.005)\n'
        "'\n"
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EAOPD_"))}
    env.update(
        EAOPD_ROOT=str(ROOT), EAOPD_ENTRY="x", EAOPD_PYTHON=str(fake), EAOPD_NPROC_PER_NODE="1",
        EAOPD_STOP_FILE=str(tmp_path / "stop"), EAOPD_STATUS_DIR=str(tmp_path / "status"),
        EAOPD_LOG_DIR=str(tmp_path), SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT="1", READY=str(tmp_path / "ready"),
        PATH=_slow_date_path(tmp_path),
    )  # fmt: skip
    proc = subprocess.Popen(
        [BASH, str(ROOT / "launch/slurm/torchrun_node.sh"), str(CONFIG)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    rc, out = _signal_when_ready(proc, tmp_path / "ready", signal.SIGTERM)
    assert "SIGTERM forwarded to training processes" in out, out
    assert rc == 0, out


def test_batch_script_keeps_a_signal_that_comes_just_before_the_step_starts(tmp_path):
    """USR1 after the "signal before training" check but before srun started (here: while the
    script logs the command): the stop file must be written, so the step stops at once."""
    _write_stop_file_step(tmp_path / "step.py", seconds=5)
    snippet = (
        "eaopd_write_launch_record() { :; }; "
        # The signal comes while the script logs "logs: ...", just before it starts the step.
        'eaopd_log() { [[ $* != logs:* ]] || kill -USR1 $$; printf "%s\\n" "$*" >&2; }; '
        "EAOPD_SIGNAL_LIST=(USR1 TERM); EAOPD_PREEMPT_SIGNALS=USR1,TERM; "
        "trap 'EAOPD_SIGNALLED=USR1' USR1; EAOPD_SIGNALLED=''; "
        "EAOPD_JOB_KEY=1; EAOPD_ATTEMPT=0; EAOPD_LOG_DIR=$T; export EAOPD_STOP_FILE=$T/stop; "
        "export EAOPD_STATUS_DIR=$T/status; mkdir -p $EAOPD_STATUS_DIR; "
        f'eaopd_run_step "{sys.executable}" "$T/step.py"'
    )
    result = bash(snippet, {"EAOPD_REQUEUE": "0", "T": str(tmp_path)})
    assert "trainer status: stopped" in result.stderr, result.stderr
    assert result.returncode == 75, result.stderr


@pytest.mark.parametrize("case", list(SHOW_JOB))
def test_batch_script_does_not_requeue_a_cancelled_job(tmp_path, case):
    """A stopped run is requeued after a signal ahead of the time limit (RUNNING), a preemption
    or the time limit itself (COMPLETING, with PreemptTime / Reason=TimeLimit); after `scancel`
    (COMPLETING without either, or CANCELLED) it is not: the requeue would revive the cancelled
    job. When scontrol cannot tell, the requeue is tried as before."""
    requeued = case not in CANCELLED
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fields = SHOW_JOB[case]
    answer = f'echo "JobId=7 JobName=x {fields} Requeue=1"' if fields else "exit 1"
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'if [[ "$1 $2" == "-o show" ]]; then {answer}; exit 0; fi\n'
        f'echo "$@" >> {tmp_path}/calls\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    snippet = "EAOPD_JOB_KEY=7; EAOPD_ATTEMPT=0; eaopd_requeue && echo REQUEUED || echo NOT"
    result = bash(snippet, {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.stdout.strip() == ("REQUEUED" if requeued else "NOT"), result.stderr
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert calls == ("requeue 7\n" if requeued else ""), calls
    if not requeued:
        assert "job 7 was cancelled (scancel: no preemption, no time limit)" in result.stderr


def test_batch_script_leaves_a_job_slurm_requeued_alone(tmp_path):
    """PreemptMode=REQUEUE: Slurm has requeued the job before the batch shell gets SIGTERM
    (Restarts > this run's attempt). Not a scancel: no "cancelled" message, no exit 75, and no
    `scontrol requeue` of its own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'if [[ "$1 $2" == "-o show" ]]; then echo "JobId=7 {REQUEUED_BY_SLURM}"; exit 0; fi\n'
        f'echo "$@" >> {tmp_path}/calls\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = "EAOPD_JOB_KEY=7; EAOPD_ATTEMPT={}; eaopd_requeue && echo REQUEUED || echo NOT"
    result = bash(run.format(0), env)
    assert result.stdout.strip() == "REQUEUED", result.stderr
    assert not (tmp_path / "calls").exists()
    assert "Slurm has already requeued job 7" in result.stderr
    # The same line seen by the run it belongs to (Restarts == attempt) is a plain scancel.
    result = bash(run.format(1), env)
    assert result.stdout.strip() == "NOT", result.stderr
    assert not (tmp_path / "calls").exists()


def test_a_failing_port_or_host_lookup_stops_the_batch_script(tmp_path):
    """`export X=$(f)` hid f's failure from set -e: the script went on to srun with an empty
    MASTER_PORT (e.g. no room for a port outside a widened ephemeral range)."""
    snippet = (
        "eaopd_master_port() { eaopd_die 'no room for a rendezvous port'; }; "
        "eaopd_first_host() { echo node1; }; eaopd_slurm_setup; echo SETUP-DONE"
    )
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "node1", "EAOPD_LOG_ROOT": str(tmp_path)}
    result = bash(snippet, env)
    assert result.returncode == 2 and "SETUP-DONE" not in result.stdout, result
    assert "no room for a rendezvous port" in result.stderr


def test_hf_import_bar_only_on_a_terminal(monkeypatch):
    """The student's HF import (model.student_hf) draws its bar under the same rule as the
    trainer's bars: never into a log file."""
    from types import SimpleNamespace

    from megatron_eaopd.trainer import build

    cfg = SimpleNamespace(logging=SimpleNamespace(progress_bars=True))
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert build._bars(cfg) is False

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    assert build._bars(cfg) is True
