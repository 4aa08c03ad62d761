"""Tests of megatron_eaopd.trainer.preemption: the signal flag, the collective stop, requeue."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import threading
import time

import pytest

from megatron_eaopd.trainer.preemption import (
    PreemptionHandler,
    parse_signals,
    preemption_signals_blocked,
    requeue_job,
    requeue_owned_by_batch_script,
    slurm_job_id,
)
from tests.dist import run_distributed
from tests.launch.jobs import CANCELLED, SHOW_JOB


def test_parse_signals_accepts_names_numbers_and_lists():
    assert parse_signals("USR1") == (signal.SIGUSR1,)
    assert parse_signals("usr1, SIGTERM,usr1") == (signal.SIGUSR1, signal.SIGTERM)
    assert parse_signals([signal.SIGUSR2, 15, "10"]) == (
        signal.SIGUSR2,
        signal.SIGTERM,
        signal.SIGUSR1,
    )
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signals("NOPE")
    with pytest.raises(ValueError, match="no signal"):
        parse_signals(" , ")


def test_default_signals_follow_the_environment(monkeypatch):
    monkeypatch.delenv("EAOPD_PREEMPT_SIGNALS", raising=False)
    assert PreemptionHandler().signals == (signal.SIGUSR1, signal.SIGTERM)
    monkeypatch.setenv("EAOPD_PREEMPT_SIGNALS", "USR2,TERM")
    assert PreemptionHandler().signals == (signal.SIGUSR2, signal.SIGTERM)


def test_signal_sets_flag_and_uninstall_restores_previous_handler():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        handler = PreemptionHandler(signals="USR1")
        with handler:
            assert not handler.received and handler.received_signal is None
            os.kill(os.getpid(), signal.SIGUSR1)
            assert handler.received
            assert handler.received_signal == signal.SIGUSR1
            assert handler.seconds_since_signal >= 0
            os.kill(os.getpid(), signal.SIGUSR1)  # a second signal must not kill us either
            assert not calls
            # No process group: the local flag is the answer, and it stays set.
            assert handler.should_stop() and handler.should_stop()
        assert signal.getsignal(signal.SIGUSR1) is previous
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_should_stop_without_signal_is_false_and_trigger_sets_it():
    handler = PreemptionHandler(signals="USR1")
    assert handler.should_stop() is False
    handler.trigger()
    assert handler.should_stop() is True
    assert handler.received_signal == signal.SIGUSR1


def test_install_outside_the_main_thread_raises():
    errors = []

    def target():
        try:
            PreemptionHandler(signals="USR1").install()
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    assert errors and "main thread" in errors[0]


def test_signal_during_a_blocked_section_is_delivered_after_it():
    with PreemptionHandler(signals="USR1") as handler:
        with preemption_signals_blocked("USR1"):
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            time.sleep(0.05)
            assert not handler.received  # pending, not lost
        assert handler.received and handler.received_signal == signal.SIGUSR1
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_process_started_in_a_blocked_section_survives_the_signal():
    """What Slurm does to a step at the pre-timeout signal: signal every process of it, here a
    multiprocessing manager like the one megatron's checkpoint writer starts (spawned, so
    without our handler)."""
    with PreemptionHandler(signals="USR1"):
        with preemption_signals_blocked("USR1"):
            manager = multiprocessing.get_context("spawn").Manager()
        try:
            queue = manager.Queue()
            os.kill(manager._process.pid, signal.SIGUSR1)
            time.sleep(0.3)
            queue.put(1)  # BrokenPipeError / ConnectionRefusedError if the manager died
            assert queue.get(timeout=10) == 1
        finally:
            manager.shutdown()


_TERM_SCRIPT = """
import multiprocessing, os, signal, sys, time
from megatron_eaopd.signals import preemption_signals_blocked

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's handler: this process lives
    with preemption_signals_blocked("USR1,TERM"):  # the first save: no resource tracker yet
        manager = multiprocessing.get_context("spawn").Manager()
        blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    queue = manager.Queue()
    os.kill(manager._process.pid, signal.SIGTERM)  # Slurm signals every process of the step
    time.sleep(0.3)
    queue.put(1)  # BrokenPipeError / EOFError if the manager died
    print(blocked, queue.get(timeout=10))
    manager.shutdown()
"""


def test_sigterm_stays_blocked_for_helpers_started_by_a_first_save():
    """multiprocessing's resource tracker, started by the first spawn, unblocked SIGTERM in the
    saving thread (SIG_UNBLOCK, not a restore): the checkpoint writer's manager then died at a
    SIGTERM preemption after the first interval checkpoint, and the stop's save failed. In a
    fresh interpreter, so that the first spawn is the one inside the block."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _TERM_SCRIPT], capture_output=True, text=True,
                          timeout=120, cwd=root, env=dict(os.environ, PYTHONPATH=root))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    blocked = [int(signal.SIGUSR1), int(signal.SIGTERM)]
    assert proc.stdout.split() == [f"[{blocked[0]},", f"{blocked[1]}]", "1"], proc.stdout


def _train_until_stopped(rank, world_size, signal_rank, signal_at, total):
    """A loop like the trainer's: the signal reaches only `signal_rank`, before `signal_at`."""
    handler = PreemptionHandler(signals="USR1").install()
    done = []
    for iteration in range(1, total + 1):
        if rank == signal_rank and iteration == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        done.append(iteration)
        if handler.should_stop():
            return {"stopped_at": iteration, "local": handler.received, "done": done}
    return {"stopped_at": None, "local": handler.received, "done": done}


def _scenarios(rank, world_size, scenarios, total):
    """Several independent training loops in one launch (spawning costs seconds)."""
    return [_train_until_stopped(rank, world_size, r, at, total) for r, at in scenarios]


@pytest.mark.parametrize("world_size", [2, 3])
def test_signal_on_one_rank_stops_all_ranks_at_the_same_iteration(world_size):
    # (rank that gets the signal, iteration at which it arrives); rank -1: no signal at all.
    scenarios = [(world_size - 1, 3), (0, 5), (1, 1), (-1, 0)]
    total = 8
    results = run_distributed(_scenarios, world_size, scenarios, total, timeout=120)
    for index, (signal_rank, signal_at) in enumerate(scenarios):
        per_rank = [results[rank][index] for rank in range(world_size)]
        expected_stop = signal_at if signal_rank >= 0 else None
        assert [r["stopped_at"] for r in per_rank] == [expected_stop] * world_size
        assert [r["local"] for r in per_rank] == [rank == signal_rank for rank in range(world_size)]
        expected_done = list(range(1, (signal_at if signal_rank >= 0 else total) + 1))
        assert all(r["done"] == expected_done for r in per_rank)


def _fake_scontrol(tmp_path, monkeypatch, rc=0, case="running"):
    """Put a fake `scontrol` first on PATH that answers `-o show job` as in SHOW_JOB[case] and
    records the arguments of every other call."""
    record = tmp_path / "scontrol.args"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    line = f"JobId=$4 JobName=x UserId=u(0) {SHOW_JOB[case]} Requeue=1 Restarts=0"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "-o show" ]; then echo "{line}"; exit 0; fi\n'
        f'echo "$@" >> {record}\nexit {rc}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return record


def test_requeue_job_calls_scontrol_under_slurm(tmp_path, monkeypatch):
    record = _fake_scontrol(tmp_path, monkeypatch)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "EAOPD_REQUEUE_BY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_job() is True
    assert record.read_text().split("\n")[0] == "requeue 4242"
    assert requeue_job("77", dry_run=True) is True  # dry run: logged, not run
    assert record.read_text().count("requeue") == 1


def test_requeue_job_skips_outside_slurm_and_under_the_batch_script(tmp_path, monkeypatch):
    record = _fake_scontrol(tmp_path, monkeypatch)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_job() is False
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("EAOPD_REQUEUE_BY", "batch")
    assert requeue_owned_by_batch_script()
    assert requeue_job() is False
    assert not record.exists()
    assert requeue_job(force=True) is True
    assert record.read_text().strip() == "requeue 5"


@pytest.mark.parametrize("case", list(SHOW_JOB))
def test_a_cancelled_job_is_not_requeued(tmp_path, monkeypatch, case):
    """scancel sends SIGTERM, which stops the run like a preemption; `scontrol requeue` of the
    cancelled job would bring it back (reproduced on a real Slurm). A preemption or a time limit
    (also COMPLETING by then) is requeued."""
    record = _fake_scontrol(tmp_path, monkeypatch, case=case)
    monkeypatch.delenv("EAOPD_REQUEUE_BY", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    cancelled = case in CANCELLED
    assert requeue_job() is not cancelled
    assert (record.read_text() if record.exists() else "") == ("" if cancelled else "requeue 31\n")


def test_a_job_slurm_requeued_is_left_alone(tmp_path, monkeypatch):
    """PreemptMode=REQUEUE: Slurm requeued the job before its SIGTERM (Restarts > this run's
    restart count). Not cancelled; requeue_job reports it requeued without a second request."""
    from megatron_eaopd.trainer.preemption import job_end
    from tests.launch.jobs import REQUEUED_BY_SLURM

    monkeypatch.setitem(SHOW_JOB, "requeued by slurm", REQUEUED_BY_SLURM)
    record = _fake_scontrol(tmp_path, monkeypatch, case="requeued by slurm")
    monkeypatch.delenv("EAOPD_REQUEUE_BY", raising=False)
    monkeypatch.delenv("EAOPD_ATTEMPT", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert job_end("31") == "requeued"
    assert requeue_job() is True
    assert not record.exists()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the run the line belongs to: a scancel
    assert job_end("31") == "cancelled"
    assert requeue_job() is False


def test_requeue_job_reports_scontrol_failure(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, rc=1)
    monkeypatch.delenv("EAOPD_REQUEUE_BY", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert requeue_job() is False


def test_slurm_job_id_uses_the_array_form():
    assert slurm_job_id({"SLURM_JOB_ID": "10"}) == "10"
    env = {"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}
    assert slurm_job_id(env) == "10_2"
    assert slurm_job_id({}) is None
