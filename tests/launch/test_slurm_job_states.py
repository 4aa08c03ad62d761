"""Why an ending job ends, on a real Slurm (slow, ~3 min): the batch shell gets SIGTERM from a
plain `scancel`, from a preemption (PreemptMode=CANCEL, GraceTime=0), from a preemption that
Slurm requeues itself (PreemptMode=REQUEUE) and from the time limit (`--time=1`), and scontrol
shows every one of them COMPLETING. `eaopd_job_end` (launch/slurm/lib.sh) and
`preemption.job_end` must say "cancelled" for the scancel (not requeued), "requeued" for
Slurm's own requeue (no second one) and "other" for the rest (requeued by the job)
(docs/slurm.md)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import LocalSlurm, running_cluster

ROOT = Path(__file__).resolve().parents[2]

# At SIGTERM the job asks both implementations, writes their answers and ends.
VICTIM = f"""#!/bin/bash
out=$1
on_term() {{
  set +e
  source "{ROOT}/launch/slurm/lib.sh" >/dev/null 2>&1
  bash_says=$(eaopd_job_end "$SLURM_JOB_ID" "${{SLURM_RESTART_COUNT:-0}}")
  py_says=$(PYTHONPATH="{ROOT}" "{sys.executable}" -c "import sys
from megatron_eaopd.trainer.preemption import job_end
print(job_end(sys.argv[1]))" "$SLURM_JOB_ID")
  echo "$bash_says $py_says" >"$out"
  exit 0
}}
trap on_term TERM
while true; do sleep 1; done
"""


class PreemptSlurm(LocalSlurm):
    """The test cluster with a low partition that a high one preempts (cancel, no grace)."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.conf.read_text().replace("KillWait=5", "KillWait=15")
        text += (
            "PreemptType=preempt/partition_prio\nPreemptMode=CANCEL\n"
            f"PartitionName=low Nodes={self.node} PriorityTier=1 PreemptMode=CANCEL "
            "GraceTime=0 MaxTime=INFINITE State=UP\n"
            f"PartitionName=lowr Nodes={self.node} PriorityTier=1 PreemptMode=REQUEUE "
            "GraceTime=0 MaxTime=INFINITE State=UP\n"
            f"PartitionName=high Nodes={self.node} PriorityTier=10 PreemptMode=OFF "
            "MaxTime=INFINITE State=UP\n"
        )
        self.conf.write_text(text)

    def run(self, *cmd, **kw):
        if cmd and cmd[0] == "sinfo":  # the readiness check reads the default partition only
            cmd = (*cmd, "-p", self.partition)
        return super().run(*cmd, **kw)


@pytest.mark.slow
def test_why_a_job_ends_scancel_preemption_requeue_time_limit():
    with running_cluster(PreemptSlurm, "the job-state test") as cluster:
        root = cluster.root
        script = Path(root) / "victim.sh"
        script.write_text(VICTIM)
        script.chmod(0o755)
        said = {}
        for case, args in (("scancel", ["-p", "debug"]), ("preemption", ["-p", "low"]),
                           ("preemption, PreemptMode=REQUEUE", ["-p", "lowr"]),
                           ("time limit", ["-p", "debug", "--time=1"])):  # fmt: skip
            out = Path(root) / f"{case.replace(' ', '-')}.txt"
            job = cluster.sbatch("--exclusive", "--requeue", "-o", os.devnull, *args,
                                 str(script), str(out))  # fmt: skip
            cluster.wait_job(job, 60, until=lambda i: i.get("JobState") == "RUNNING")
            time.sleep(2)
            if case == "scancel":
                cluster.run("scancel", str(job), check=False)
            elif case.startswith("preemption"):
                high = cluster.sbatch("--exclusive", "-p", "high", "--wrap", "sleep 2", "-o",
                                      os.devnull)  # fmt: skip
            cluster.wait_job(job, 200, until=lambda i: i.get("JobState") not in
                             ("RUNNING", "COMPLETING"))  # fmt: skip
            said[case] = out.read_text().split() if out.exists() else None
            cluster.run("scancel", str(job), check=False)
            if case.startswith("preemption"):
                cluster.run("scancel", str(high), check=False)
            time.sleep(6)  # the node is free again
    assert said == {"scancel": ["cancelled", "cancelled"],
                    "preemption": ["other", "other"],
                    # Slurm requeued it before the SIGTERM (Restarts=1, no PreemptTime printed)
                    "preemption, PreemptMode=REQUEUE": ["requeued", "requeued"],
                    "time limit": ["other", "other"]}, said  # fmt: skip
