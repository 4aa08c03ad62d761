"""A throw-away Slurm cluster on loopback for the launch tests: munged, slurmctld and one slurmd.

`LocalSlurm(root).start()` writes a munge key, a slurm.conf on free ports and starts the three
daemons in the foreground as children of this process, so each is known by its PID. `stop()`
cancels the cluster's jobs, stops the daemons (SIGTERM, then SIGKILL after a grace period) and
finally kills, by PID, every leftover process whose environment names this cluster's slurm.conf
(slurmstepd, batch shells, srun and the tasks they started). Every wait has a deadline.

Debian 12 packages:
`apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge`.
`ensure_slurm_installed()` runs that line when the binaries are missing and we are root; anything
that goes wrong raises `SlurmUnavailable` with the reason, which the tests turn into a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

#: Job states after which a job will not run again by itself.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


class SlurmUnavailable(RuntimeError):
    """Slurm could not be installed or started here; the message says why."""


def _search_path() -> str:
    return os.environ.get("PATH", "/usr/bin:/bin") + ":" + _SBIN_PATH


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def ensure_slurm_installed(timeout: float = 600.0) -> None:
    """Install Debian's Slurm and munge packages with apt-get when a binary is missing."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return
    apt = _which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise SlurmUnavailable(
            f"missing {missing}; install them with: apt-get install -y --no-install-recommends "
            + " ".join(APT_PACKAGES)
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [apt, "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:  # the package lists may be missing on a fresh image
        subprocess.run([apt, "update"], env=env, capture_output=True, timeout=timeout)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    missing = [b for b in BINARIES if _which(b) is None]
    if result.returncode != 0 or missing:
        raise SlurmUnavailable(
            f"apt-get install of {APT_PACKAGES} failed (rc={result.returncode}, still missing "
            f"{missing}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while /proc/PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _node_hardware() -> tuple[str, int, int]:
    """(NodeName, CPUs, RealMemory MiB) as `slurmd -C` reports them."""
    out = subprocess.run(
        [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30
    ).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    name = fields.get("NodeName") or socket.gethostname().split(".")[0]
    cpus = int(fields.get("CPUs", os.cpu_count() or 1))
    memory = int(fields.get("RealMemory", 1024))
    return name, cpus, max(256, int(memory * 0.9))


class LocalSlurm:
    """A one-node Slurm 22.05 cluster rooted in `root` (keep the path short: socket <108 bytes)."""

    def __init__(self, root: str | os.PathLike, partition: str = "debug", cred_expire: int = 5):
        self.root = Path(root)
        #: Seconds a requeued job waits before it may start again (Slurm's default: 120).
        self.cred_expire = cred_expire
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.sock"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = ""
        self.cpus = 0

    # -- environment and client commands -------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for clients and jobs: SLURM_CONF set, sbin on PATH, no inherited SLURM_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _search_path()
        return env

    def run(self, *cmd: str, timeout: float = 30.0, check: bool = True):
        """Run a Slurm client command against this cluster."""
        result = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}"
                f"\n{self.daemon_logs()}"
            )
        return result

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> int:
        """Submit a batch job; return its id."""
        full_env = self.env
        full_env.update(env or {})
        result = subprocess.run(
            [_which("sbatch") or "sbatch", "--parsable", *args],
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol -o show job ID` as a dict (JobState, ExitCode, Restarts, ...); {} if gone."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_job(
        self, job_id: int, timeout: float, until=None, poll: float = 0.2
    ) -> dict[str, str]:
        """Wait until `until(info)` is true (default: a final state); raise TimeoutError after."""
        until = until or (lambda info: info.get("JobState") in FINAL_STATES)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not done after {timeout:.0f}s; last state {info}\n{self.daemon_logs()}"
        )

    def daemon_logs(self, tail: int = 1500) -> str:
        """The end of each daemon's log, for failure messages."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"--- {name} log (tail) ---\n{text[-tail:]}")
        return "\n".join(parts)

    # -- start / stop ---------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.node, self.cpus, memory = _node_hardware()
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)
        if len(str(self.socket)) >= 100:
            raise SlurmUnavailable(f"munge socket path too long (>=108 bytes): {self.socket}")
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        self.conf.write_text(
            f"""# written by tests/launch/slurm_cluster.py
ClusterName=eaopdtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
JobRequeue=1
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - closed with the proc
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def _wait_for(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n"
                        f"{self.daemon_logs()}\n{self._outs()}"
                    )
            if check():
                return
            time.sleep(0.1)
        raise SlurmUnavailable(
            f"timed out after {timeout:.0f}s waiting for {what}\n"
            f"{self.daemon_logs()}\n{self._outs()}"
        )

    def _outs(self) -> str:
        parts = []
        for name in self.procs:
            path = self.root / "log" / f"{name}.out"
            if path.exists():
                parts.append(f"--- {name} stdout ---\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        ensure_slurm_installed()
        self._write_config()
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                "--force",
                f"--key-file={m / 'munge.key'}",
                f"--socket={self.socket}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        self._wait_for("the munge socket", self.socket.exists, timeout)
        conf = str(self.conf)
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-c", "-i", "-f", conf])
        self._wait_for(
            "slurmctld to answer",
            lambda: self.run("scontrol", "ping", check=False, timeout=10).returncode == 0,
            timeout,
        )
        self._spawn("slurmd", [_which("slurmd") or "slurmd", "-D", "-f", conf])

        def node_idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).stdout
            return out.strip().rstrip("*") == "idle"

        self._wait_for("the node to become idle", node_idle, timeout)
        return self

    def _cluster_pids(self) -> list[int]:
        """PIDs (not ours) whose environment carries this cluster's SLURM_CONF."""
        needle = f"SLURM_CONF={self.conf}\0".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    def stop(self, grace: float = 10.0) -> None:
        """Cancel jobs, stop the daemons and kill leftovers, every one by PID, with deadlines."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.monotonic() + grace
                    while (
                        time.monotonic() < deadline
                        and self.run(
                            "squeue", "-h", "-o", "%i", check=False, timeout=10
                        ).stdout.strip()
                    ):
                        time.sleep(0.2)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        leftovers = [pid for pid in self._cluster_pids() if _alive(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (grace / 2 if sig == signal.SIGTERM else grace)
            while time.monotonic() < deadline and any(_alive(p) for p in leftovers):
                time.sleep(0.1)
            leftovers = [p for p in leftovers if _alive(p)]
            if not leftovers:
                break

    def __enter__(self) -> LocalSlurm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running_cluster(cls: type[LocalSlurm] = LocalSlurm, what: str = "the launch tests"):
    """A started ``cls`` cluster in a short temporary folder (the munge socket path must stay
    under 108 bytes); stopped by PID and its folder removed afterwards, also when a test fails.
    If Slurm cannot be installed or started, the test FAILS with the reason: CI must run it."""
    import pytest

    root = tempfile.mkdtemp(prefix="eslurm-", dir="/tmp")
    cluster = cls(root)
    try:
        try:
            cluster.start()
        except (SlurmUnavailable, OSError, TimeoutError) as exc:
            pytest.fail(f"cannot start a local Slurm for {what}: {exc}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
