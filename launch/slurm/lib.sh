# shellcheck shell=bash
# Batch-script side of the Slurm launchers (sourced by launch/slurm/*.sbatch; runs nothing).
#
# Settings (environment variables, all optional):
#   EAOPD_LOG_ROOT       parent of the per-job log folder (default: $EAOPD_ROOT/logs)
#   EAOPD_MASTER_ADDR    rendezvous host (default: first node of the allocation)
#   EAOPD_MASTER_PORT    rendezvous port (default: derived from the job id and the attempt, outside
#                        the kernel's ephemeral port range, /proc/sys/net/ipv4/ip_local_port_range)
#   EAOPD_PREEMPT_SIGNALS  signals that lead to a checkpoint and a requeue (default: USR1,TERM)
#   EAOPD_REQUEUE=0      never requeue a run that stopped early (default: 1)
#   EAOPD_MAX_REQUEUES   stop requeueing after this many restarts (default: 20)
#   EAOPD_FORWARD_AFTER  seconds after the step starts before a signal is forwarded to srun (the
#                        stop file covers the start; default: 2)
#   EAOPD_CONTAINER_IMAGE / EAOPD_CONTAINER_MOUNTS / EAOPD_CONTAINER_WORKDIR / EAOPD_CONTAINER_NAME
#                        pyxis: --container-image / -mounts / -workdir / -name for the srun step;
#                        the repository and the submit folder are always mounted at the same
#                        paths, EAOPD_CONTAINER_MOUNTS adds to them; the workdir defaults to the
#                        submit folder (where relative paths point)
#   EAOPD_SRUN_ARGS      extra srun arguments (split on spaces)
#   EAOPD_DRY_RUN=1      print the srun command, run nothing
#
# Exit status of the batch script, hence the job's state (docs/slurm.md):
#   0  the run finished (COMPLETED), or it stopped early and was requeued (PENDING again)
#   75 the run stopped early with a checkpoint and was NOT requeued (FAILED 75:0)
#   2  configuration or data error reported by the trainer (FAILED 2:0)
#   other: the training step failed with that status (FAILED)

# shellcheck source=launch/common.sh
source "$EAOPD_ROOT/launch/common.sh"

# First host of the allocation (no `head`: with pipefail a closed pipe would fail the script).
eaopd_first_host() {
  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
  [[ ${#hosts[@]} -gt 0 ]] || eaopd_die "scontrol show hostnames returned nothing for $SLURM_JOB_NODELIST"
  echo "${hosts[0]}"
}

# The id to requeue: array jobs are addressed as ARRAYJOB_TASK.
eaopd_job_key() {
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "${SLURM_JOB_ID:?not running inside a Slurm job}"
  fi
}

EAOPD_EXIT_STOPPED=75

# eaopd_master_port JOB_ID ATTEMPT [LOW HIGH]: a rendezvous port from the widest stretch of ports
# outside the kernel's ephemeral range LOW-HIGH (default: /proc/sys/net/ipv4/ip_local_port_range),
# 10000-LOW or HIGH-65535, so that no outgoing connection on the node can hold it. Moves with the
# attempt: a requeued job (same id) never meets a lingering socket of its previous attempt.
eaopd_master_port() {
  local job=$1 attempt=$2 low=${3:-} high=${4:-} start size
  if [[ -z $low ]]; then
    read -r low high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || {
      low=32768
      high=60999
    }
  fi
  if ((low - 10000 >= 65535 - high)); then
    start=10000
    size=$((low - 10000))
  else
    start=$((high + 1))
    size=$((65535 - high))
  fi
  ((size >= 100)) || eaopd_die "the ephemeral port range $low-$high leaves no room for a" \
    "rendezvous port: set EAOPD_MASTER_PORT"
  echo $((start + (job + 7919 * attempt) % size))
}

# eaopd_min_cpus_per_node SPEC: the smallest CPU count of SLURM_JOB_CPUS_PER_NODE ("72(x2),64"
# -> 64); nothing for an empty or unreadable SPEC. Logs when the nodes differ.
eaopd_min_cpus_per_node() {
  local spec=$1 item count min="" max=""
  local -a items
  IFS=, read -r -a items <<<"$spec"
  for item in "${items[@]}"; do
    count=${item%%(*}
    [[ $count =~ ^[0-9]+$ ]] || return 0
    if [[ -z $min ]] || ((count < min)); then min=$count; fi
    if [[ -z $max ]] || ((count > max)); then max=$count; fi
  done
  if [[ -n $min && $min != "$max" ]]; then
    eaopd_log "the nodes have $min to $max CPUs ($spec): every node's task gets $min"
  fi
  echo "$min"
}

# Export the rendezvous, log folder, stop file and container settings.
eaopd_slurm_setup() {
  local job_key attempt sig signals
  signals=$(eaopd_preempt_signals) # exits on an unknown name
  mapfile -t EAOPD_SIGNAL_LIST <<<"$signals"
  [[ -n ${EAOPD_SIGNAL_LIST[0]:-} ]] || eaopd_die "EAOPD_PREEMPT_SIGNALS names no signal (e.g. USR1,TERM)"
  EAOPD_PREEMPT_SIGNALS=$(
    IFS=,
    echo "${EAOPD_SIGNAL_LIST[*]}"
  )
  export EAOPD_PREEMPT_SIGNALS
  # A preemption signal during the set-up must not kill this shell: remember it (eaopd_run_step).
  EAOPD_SIGNALLED=""
  for sig in $(eaopd_trapped_signals); do
    # shellcheck disable=SC2064  # expand now: one trap per signal
    trap "EAOPD_SIGNALLED=$sig" "$sig"
  done
  job_key=$(eaopd_job_key)
  attempt=${SLURM_RESTART_COUNT:-0}
  eaopd_python_defaults
  eaopd_nccl_defaults

  # Assigned, then exported: `export X=$(f)` would hide f's failure from set -e.
  MASTER_ADDR="${EAOPD_MASTER_ADDR:-$(eaopd_first_host)}"
  MASTER_PORT="${EAOPD_MASTER_PORT:-$(eaopd_master_port "${SLURM_JOB_ID:?}" "$attempt")}"
  export MASTER_ADDR MASTER_PORT

  export EAOPD_JOB_KEY="$job_key"
  export EAOPD_ATTEMPT="$attempt"
  export EAOPD_LOG_DIR="${EAOPD_LOG_ROOT:-$EAOPD_ROOT/logs}/${SLURM_JOB_NAME:-eaopd}-${job_key}"
  # The batch script requeues after the trainer exits; the trainer must not (preemption.py).
  export EAOPD_REQUEUE_BY=batch
  # How each rank ended (trainer.preemption.write_exit_status), and the stop file that tells the
  # trainer to save and stop even when a signal never reached it (caught before it existed).
  export EAOPD_STATUS_DIR="$EAOPD_LOG_DIR/status-attempt$attempt"
  export EAOPD_STOP_FILE="$EAOPD_LOG_DIR/stop-attempt$attempt"
  if [[ ${EAOPD_DRY_RUN:-0} != 1 ]]; then # a dry run prints the command and writes nothing
    mkdir -p "$EAOPD_LOG_DIR"
    rm -rf "$EAOPD_STATUS_DIR" "$EAOPD_STOP_FILE"
    mkdir -p "$EAOPD_STATUS_DIR"
  fi

  EAOPD_CONTAINER_ARGS=()
  if [[ -n ${EAOPD_CONTAINER_IMAGE:-} ]]; then
    # The repository and the submit folder (relative config paths, runs/) at the same paths, so
    # the command line works unchanged inside the container; EAOPD_CONTAINER_MOUNTS adds more.
    local mounts="$EAOPD_ROOT:$EAOPD_ROOT"
    if [[ $PWD != "$EAOPD_ROOT" ]]; then mounts+=",$PWD:$PWD"; fi
    if [[ -n ${EAOPD_CONTAINER_MOUNTS:-} ]]; then mounts+=",$EAOPD_CONTAINER_MOUNTS"; fi
    EAOPD_CONTAINER_ARGS+=(
      "--container-image=$EAOPD_CONTAINER_IMAGE"
      "--container-mounts=$mounts"
      "--container-workdir=${EAOPD_CONTAINER_WORKDIR:-$PWD}"
    )
    if [[ -n ${EAOPD_CONTAINER_NAME:-} ]]; then
      EAOPD_CONTAINER_ARGS+=("--container-name=$EAOPD_CONTAINER_NAME")
    fi
  fi
  EAOPD_EXTRA_SRUN_ARGS=()
  if [[ -n ${EAOPD_SRUN_ARGS:-} ]]; then
    # shellcheck disable=SC2034  # read by the sbatch script
    read -r -a EAOPD_EXTRA_SRUN_ARGS <<<"$EAOPD_SRUN_ARGS"
  fi
  # srun in Slurm 22.05 does not inherit --cpus-per-task from the batch job: pass it on.
  EAOPD_CPUS_ARGS=()
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    # shellcheck disable=SC2034  # read by the sbatch script
    EAOPD_CPUS_ARGS=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
  fi
}

# Write the config (merged with its defaults: parents, overrides applied) into the job's log
# folder; without a python that can read it here (e.g. only inside a container), copy the file
# as given. The trainer saves the fully resolved config as <training.output_dir>/config.yaml.
eaopd_write_merged_config() {
  local out=$EAOPD_LOG_DIR/config.yaml err
  [[ -e $out ]] && return 0
  if err=$("$EAOPD_PYTHON" - "$EAOPD_CONFIG" "${EAOPD_OVERRIDES[@]}" 2>&1 >"$out.tmp" <<'PY'
import sys

import yaml

from megatron_eaopd.config.loader import apply_overrides, load_yaml_with_defaults

data = apply_overrides(load_yaml_with_defaults(sys.argv[1]), sys.argv[2:])
print(f"# {sys.argv[1]} merged with its defaults: files, then the command-line overrides")
print("# (the trainer saves the complete config as <training.output_dir>/config.yaml)")
yaml.safe_dump(data, sys.stdout, sort_keys=False, default_flow_style=False)
PY
  ); then
    mv "$out.tmp" "$out"
  else
    rm -f "$out.tmp"
    cp "$EAOPD_CONFIG" "$out"
    eaopd_log "could not merge the config here (${err##*$'\n'}): copied $EAOPD_CONFIG as given"
  fi
}

# Write what this attempt runs into the job's log folder.
eaopd_write_launch_record() {
  local record="$EAOPD_LOG_DIR/launch-attempt${EAOPD_ATTEMPT}.txt" commit=unknown
  if command -v git >/dev/null 2>&1; then
    commit=$(git -C "$EAOPD_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  fi
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "job: $EAOPD_JOB_KEY name=${SLURM_JOB_NAME:-} attempt=$EAOPD_ATTEMPT"
    echo "nodes: ${SLURM_JOB_NUM_NODES:-?} ${SLURM_JOB_NODELIST:-?}"
    echo "master: $MASTER_ADDR:$MASTER_PORT"
    echo "root: $EAOPD_ROOT (commit $commit)"
    echo "config: $EAOPD_CONFIG"
    echo "entry: $EAOPD_PYTHON -m $EAOPD_ENTRY"
    echo "preemption signals: $EAOPD_PREEMPT_SIGNALS; stop file: $EAOPD_STOP_FILE"
    echo "command: $(eaopd_print_cmd "$@")"
  } >"$record"
  eaopd_write_merged_config
}

# Requeue this job unless disabled or out of restarts; returns 0 when requeued.
eaopd_requeue() {
  local max=${EAOPD_MAX_REQUEUES:-20}
  if [[ ${EAOPD_REQUEUE:-1} == 0 ]]; then
    eaopd_log "EAOPD_REQUEUE=0: not requeueing; resubmit the same command to resume"
    return 1
  fi
  if ((EAOPD_ATTEMPT >= max)); then
    eaopd_log "already restarted $EAOPD_ATTEMPT times (EAOPD_MAX_REQUEUES=$max): not requeueing"
    return 1
  fi
  # scancel sends this shell SIGTERM, which stops the run like a preemption: requeueing the
  # cancelled job would bring it back. A preemption with PreemptMode=REQUEUE has requeued the job
  # before its processes got the signal: nothing to do.
  case $(eaopd_job_end "$EAOPD_JOB_KEY" "$EAOPD_ATTEMPT") in
    cancelled)
      eaopd_log "job $EAOPD_JOB_KEY was cancelled (scancel: no preemption, no time limit): not requeueing"
      return 1
      ;;
    requeued)
      eaopd_log "Slurm has already requeued job $EAOPD_JOB_KEY (preemption with PreemptMode=REQUEUE, or scontrol requeue): attempt $((EAOPD_ATTEMPT + 1)) will resume from the checkpoint"
      return 0
      ;;
  esac
  eaopd_log "requeueing job $EAOPD_JOB_KEY (attempt $((EAOPD_ATTEMPT + 1)) will resume from the checkpoint)"
  if ! scontrol requeue "$EAOPD_JOB_KEY"; then
    eaopd_log "scontrol requeue $EAOPD_JOB_KEY failed (is the job requeueable: --requeue, JobRequeue?)"
    return 1
  fi
}

# eaopd_job_end JOB ATTEMPT: why the job is ending, from the first occurrence of each field of
# `scontrol -o show job JOB` (free text printed later, Comment= or WorkDir=, may hold words such
# as Reason=TimeLimit). While a job ends, scontrol shows JobState=COMPLETING whatever the cause.
# Measured on Slurm 22.05 (docs/slurm.md):
#   requeued   Slurm has requeued the job itself: Restarts > ATTEMPT (this run's
#              SLURM_RESTART_COUNT). PreemptMode=REQUEUE does so before the job's processes get
#              SIGTERM; the job then shows COMPLETING, Reason=None and no PreemptTime at all.
#   cancelled  CANCELLED, or COMPLETING with Reason=None and no PreemptTime of this run (a
#              PreemptTime before this run's StartTime would be an earlier run's), or one that
#              ended (EndTime) more than a second after PreemptTime: a scancel during a
#              preemption's GraceTime (a preemption that kills the job sets PreemptTime to the
#              kill time, = EndTime, also when its GraceTime runs out)
#   other      running (a --signal lead time, a preemption's GraceTime), preempted (PreemptTime),
#              time limit (Reason=TimeLimit), or scontrol could not tell (the requeue is tried)
eaopd_job_end() {
  local line attempt=${2:-0} state reason preempt start end restarts
  line=$(scontrol -o show job "$1" 2>/dev/null | head -n 1 || true)
  state=$(grep -o ' JobState=[^ ]*' <<<" $line" | head -n 1 | cut -d= -f2 || true)
  reason=$(grep -o ' Reason=[^ ]*' <<<" $line" | head -n 1 | cut -d= -f2 || true)
  preempt=$(grep -o ' PreemptTime=[^ ]*' <<<" $line" | head -n 1 | cut -d= -f2 || true)
  start=$(grep -o ' StartTime=[^ ]*' <<<" $line" | head -n 1 | cut -d= -f2 || true)
  restarts=$(grep -o ' Restarts=[^ ]*' <<<" $line" | head -n 1 | cut -d= -f2 || true)
  end=$(grep -o ' EndTime=[^ ]*' <<<" $line" | head -n 1 | cut -d= -f2 || true)
  if [[ $restarts =~ ^[0-9]+$ && $attempt =~ ^[0-9]+$ ]] && ((restarts > attempt)); then
    echo requeued
  elif [[ $state == CANCELLED ]]; then
    echo cancelled
  elif [[ $state == COMPLETING && $reason == None ]] &&
    { [[ ${preempt:-None} == None ]] || [[ $preempt =~ ^[0-9T:-]+$ && $start =~ ^[0-9T:-]+$ && $preempt < $start ]] ||
      eaopd_seconds_after "$preempt" "$end" 1; }; then
    echo cancelled
  else
    echo other
  fi
}

# eaopd_seconds_after T0 T1 N: whether the time T1 is more than N seconds after T0 (scontrol's
# local times, 2026-12-02T03:05:09); false when either is not a time.
eaopd_seconds_after() {
  local t0 t1
  [[ $1 =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}$ && $2 =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}$ ]] || return 1
  t0=$(date -d "$1" +%s 2>/dev/null) && t1=$(date -d "$2" +%s 2>/dev/null) || return 1
  ((t1 - t0 > $3))
}

# The run stopped early (checkpoint saved, iterations left): requeue, else exit 75.
eaopd_stopped_early() {
  if eaopd_requeue; then exit 0; fi
  eaopd_log "the run stopped early and was not requeued: exit $EAOPD_EXIT_STOPPED (resubmit to resume)"
  exit "$EAOPD_EXIT_STOPPED"
}

# How the trainer ended, from the status files of its ranks: "stopped" when any rank stopped
# early, else "finished" when one finished, else "config_error"/"failed", else "" (none written).
eaopd_trainer_status() {
  local file status found=""
  for file in "$EAOPD_STATUS_DIR"/rank*; do
    [[ -f $file ]] || continue
    read -r status _ <"$file" || continue
    case $status in
      stopped) found=stopped ;;
      finished) [[ $found == stopped ]] || found=finished ;;
      *) [[ -n $found ]] || found=$status ;;
    esac
  done
  echo "$found"
}

# The signals the batch shell traps, one per line: the preemption signals (EAOPD_SIGNAL_LIST)
# and, always, USR1: the sbatch scripts' --signal=B:USR1@300 (the time-limit warning) killed the
# job when USR1 was not in the list. Not a preemption signal, USR1 only writes the stop file
# (eaopd_forward_signal).
eaopd_trapped_signals() {
  printf '%s\n' "${EAOPD_SIGNAL_LIST[@]}"
  [[ ",$EAOPD_PREEMPT_SIGNALS," == *,USR1,* ]] || echo USR1
}

# eaopd_forward_signal SIG PID: pass a caught preemption signal on to a training step. srun turns
# SIGTERM (and SIGINT, SIGHUP) into SIGKILL for its tasks, so those are forwarded as SIGUSR1 when
# USR1 is a preemption signal, else not at all: the stop file carries them (and USR1 itself when
# it is not one: the trainer does not catch it, and it would kill the tasks).
eaopd_forward_signal() {
  local sig=$1 pid=$2
  [[ $sig != USR1 || ",$EAOPD_PREEMPT_SIGNALS," == *,USR1,* ]] || return 0
  case $sig in
    TERM | INT | HUP | QUIT)
      if [[ ",$EAOPD_PREEMPT_SIGNALS," == *,USR1,* ]]; then sig=USR1; else return 0; fi
      ;;
  esac
  kill -s "$sig" "$pid" 2>/dev/null && echo "SIG$sig"
}

# eaopd_run_step SRUN_CMD...: run the training step; on a preemption signal write the stop file
# and forward the signal; when the step ends, requeue only a run that stopped early. Exits the
# batch script: 0 finished (or requeued), 75 stopped and not requeued, else the step's status.
eaopd_run_step() {
  local rc=0 sig status
  if [[ ${EAOPD_DRY_RUN:-0} == 1 ]]; then
    eaopd_print_cmd "$@"
    exit 0
  fi
  eaopd_write_launch_record "$@"
  # Slurm's --signal=B:<sig>@<secs> reaches only this shell: write the stop file (the trainer
  # polls it every iteration, even if it does not exist yet) and pass the signal on to srun.
  # Installed before the check below, so that a signal between the check and the start of the
  # step is not lost: the stop file is there when the trainer starts.
  # shellcheck disable=SC2317  # called through trap
  eaopd_on_signal() {
    local sent=""
    EAOPD_SIGNALLED=$1
    : >>"$EAOPD_STOP_FILE"
    # In the step's first seconds srun and the tasks may not have their handlers yet (a
    # signal would kill them): the stop file alone stops the trainer at iteration one.
    if [[ -n $EAOPD_STEP_PID ]] && ((SECONDS - EAOPD_STEP_START >= ${EAOPD_FORWARD_AFTER:-2})); then
      sent=$(eaopd_forward_signal "$1" "$EAOPD_STEP_PID" || true)
    fi
    eaopd_log "caught SIG$1: wrote the stop file; forwarded ${sent:-no signal} to the training step (srun pid ${EAOPD_STEP_PID:-none yet})"
  }
  EAOPD_STEP_PID="" EAOPD_STEP_START=$SECONDS
  for sig in $(eaopd_trapped_signals); do
    # shellcheck disable=SC2064  # expand now: one trap per signal
    trap "eaopd_on_signal $sig" "$sig"
  done
  if [[ -n ${EAOPD_SIGNALLED:-} ]]; then
    eaopd_log "SIG$EAOPD_SIGNALLED arrived before training started: not starting it"
    eaopd_stopped_early
  fi
  eaopd_log "job $EAOPD_JOB_KEY attempt $EAOPD_ATTEMPT: $(eaopd_print_cmd "$@")"
  eaopd_log "logs: $EAOPD_LOG_DIR"

  EAOPD_STEP_START=$SECONDS
  "$@" &
  EAOPD_STEP_PID=$!

  rc=0
  eaopd_wait_child "$EAOPD_STEP_PID" || rc=$? # srun's own status, through the trapped signals
  # From here on a signal changes nothing (requeueing sends this shell SIGTERM).
  for sig in $(eaopd_trapped_signals); do trap '' "$sig"; done
  status=$(eaopd_trainer_status)
  eaopd_log "training step exited with status $rc; trainer status: ${status:-none written}"

  if [[ $rc != 0 ]]; then
    [[ -z $EAOPD_SIGNALLED ]] || eaopd_log "the step failed after the signal: not requeueing (check the logs in $EAOPD_LOG_DIR)"
    exit "$rc"
  fi
  case $status in
    stopped) eaopd_stopped_early ;;
    finished)
      eaopd_log "the run finished${EAOPD_SIGNALLED:+ (SIG$EAOPD_SIGNALLED came too late to stop it)}"
      exit 0
      ;;
    "")
      if [[ -n $EAOPD_SIGNALLED ]]; then
        eaopd_log "no trainer status in $EAOPD_STATUS_DIR: taking exit 0 after SIG$EAOPD_SIGNALLED as a stop"
        eaopd_stopped_early
      fi
      exit 0
      ;;
    *)
      eaopd_log "trainer status '$status' with exit 0: treating it as a failure"
      exit 1
      ;;
  esac
}
