# shellcheck shell=bash
# Batch-script side of the Slurm launchers (sourced by launch/slurm/*.sbatch; runs nothing).
#
# Settings (environment variables, all optional):
#   EAOPD_LOG_ROOT       parent of the per-job log folder (default: $EAOPD_ROOT/logs)
#   EAOPD_MASTER_ADDR    rendezvous host (default: first node of the allocation)
#   EAOPD_MASTER_PORT    rendezvous port (default: derived from the job id and the attempt)
#   EAOPD_SIGNAL         pre-timeout signal name, must match #SBATCH --signal (default: USR1)
#   EAOPD_REQUEUE=0      never requeue after the signal (default: 1)
#   EAOPD_MAX_REQUEUES   stop requeueing after this many restarts (default: 20)
#   EAOPD_CONTAINER_IMAGE / EAOPD_CONTAINER_MOUNTS / EAOPD_CONTAINER_WORKDIR / EAOPD_CONTAINER_NAME
#                        pyxis: --container-image / -mounts / -workdir / -name for the srun step;
#                        mounts default to the repository and the submit folder at the same
#                        paths, the workdir to the submit folder (where relative paths point)
#   EAOPD_SRUN_ARGS      extra srun arguments (split on spaces)
#   EAOPD_DRY_RUN=1      print the srun command, run nothing

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

# Export the rendezvous, log folder and container settings; write launch-attempt<N>.txt.
eaopd_slurm_setup() {
  local job_key attempt
  # A pre-timeout signal during the set-up must not kill this shell: remember it (eaopd_run_step).
  EAOPD_SIGNALLED=0
  trap 'EAOPD_SIGNALLED=1' "${EAOPD_SIGNAL:-USR1}"
  job_key=$(eaopd_job_key)
  attempt=${SLURM_RESTART_COUNT:-0}
  eaopd_python_defaults
  eaopd_nccl_defaults

  export MASTER_ADDR="${EAOPD_MASTER_ADDR:-$(eaopd_first_host)}"
  # Same job id after a requeue: move the port with the attempt so a lingering socket never clashes.
  export MASTER_PORT="${EAOPD_MASTER_PORT:-$((15000 + (${SLURM_JOB_ID:?} + 7919 * attempt) % 20000))}"

  export EAOPD_JOB_KEY="$job_key"
  export EAOPD_ATTEMPT="$attempt"
  export EAOPD_LOG_DIR="${EAOPD_LOG_ROOT:-$EAOPD_ROOT/logs}/${SLURM_JOB_NAME:-eaopd}-${job_key}"
  # The batch script requeues after the trainer exits; the trainer must not (preemption.py).
  export EAOPD_REQUEUE_BY=batch
  mkdir -p "$EAOPD_LOG_DIR"

  EAOPD_CONTAINER_ARGS=()
  if [[ -n ${EAOPD_CONTAINER_IMAGE:-} ]]; then
    # Default mounts: the repository and the submit folder (relative config paths, runs/) at
    # the same paths, so the command line works unchanged inside the container.
    local mounts="$EAOPD_ROOT:$EAOPD_ROOT"
    if [[ $PWD != "$EAOPD_ROOT" ]]; then mounts+=",$PWD:$PWD"; fi
    EAOPD_CONTAINER_ARGS+=(
      "--container-image=$EAOPD_CONTAINER_IMAGE"
      "--container-mounts=${EAOPD_CONTAINER_MOUNTS:-$mounts}"
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
    echo "command: $(eaopd_print_cmd "$@")"
  } >"$record"
  if [[ ! -e $EAOPD_LOG_DIR/config.yaml ]]; then cp "$EAOPD_CONFIG" "$EAOPD_LOG_DIR/config.yaml"; fi
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
  eaopd_log "requeueing job $EAOPD_JOB_KEY (attempt $((EAOPD_ATTEMPT + 1)) will resume from the checkpoint)"
  scontrol requeue "$EAOPD_JOB_KEY"
}

# eaopd_run_step SRUN_CMD...: run the training step, forward the pre-timeout signal to it, wait
# for it to save and exit, then requeue. Exits the batch script with the step's status.
eaopd_run_step() {
  local signal_name=${EAOPD_SIGNAL:-USR1} rc=0
  if [[ ${EAOPD_DRY_RUN:-0} == 1 ]]; then
    eaopd_print_cmd "$@"
    exit 0
  fi
  eaopd_write_launch_record "$@"
  if [[ ${EAOPD_SIGNALLED:-0} == 1 ]]; then
    eaopd_log "SIG$signal_name arrived before training started: not starting it"
    if eaopd_requeue; then exit 0; fi
    exit 1
  fi
  eaopd_log "job $EAOPD_JOB_KEY attempt $EAOPD_ATTEMPT: $(eaopd_print_cmd "$@")"
  eaopd_log "logs: $EAOPD_LOG_DIR"

  "$@" &
  EAOPD_STEP_PID=$!
  # Slurm's --signal=B:<sig>@<secs> reaches only this shell: pass it on to srun, which forwards it
  # to every task of the step. The training processes catch it, agree on a last iteration, save.
  # shellcheck disable=SC2317  # called through trap
  eaopd_on_signal() {
    EAOPD_SIGNALLED=1
    eaopd_log "caught SIG$signal_name: forwarding it to the training step (srun pid $EAOPD_STEP_PID)"
    kill -s "$signal_name" "$EAOPD_STEP_PID" 2>/dev/null || true
  }
  trap eaopd_on_signal "$signal_name"

  while :; do
    rc=0
    wait "$EAOPD_STEP_PID" || rc=$?
    # wait also returns when a trapped signal arrives: keep waiting while srun lives.
    kill -0 "$EAOPD_STEP_PID" 2>/dev/null || break
  done
  trap - "$signal_name"
  eaopd_log "training step exited with status $rc"

  if [[ $EAOPD_SIGNALLED == 1 ]]; then
    if [[ $rc == 0 ]]; then
      if eaopd_requeue; then exit 0; fi
    else
      eaopd_log "the step failed after the signal: not requeueing (check the logs in $EAOPD_LOG_DIR)"
    fi
  fi
  exit "$rc"
}
