#!/usr/bin/env bash
# One Slurm task per GPU: map Slurm's task ids to torch.distributed's environment and become the
# training process. Started by eaopd_per_gpu.sbatch through srun; not meant to be run by hand.
#
# usage: task.sh CONFIG [dotted.overrides...]
# sets: RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID,
#       LOCAL_WORLD_SIZE=tasks on this node, GROUP_RANK/NODE_RANK=SLURM_NODEID
# needs: EAOPD_ROOT, MASTER_ADDR, MASTER_PORT (exported by the batch script)
set -euo pipefail
# Ignore the preemption signals the batch script exported from the first line: one that arrives
# while this script starts must not end the task (the names are checked again below).
sigs=${EAOPD_PREEMPT_SIGNALS:-}
for sig in ${sigs//,/ }; do trap '' "$sig" 2>/dev/null || true; done

: "${EAOPD_ROOT:?EAOPD_ROOT must be set by the batch script}"
# shellcheck source=launch/common.sh
source "$EAOPD_ROOT/launch/common.sh"

config=${1:?usage: task.sh CONFIG [overrides...]}
shift

# Tasks on this node: SLURM_STEP_TASKS_PER_NODE is e.g. "8(x4)" or "8,7"; take this node's entry.
local_world_size() {
  local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}} item count reps node=0
  local -a items
  IFS=, read -r -a items <<<"$spec"
  for item in "${items[@]}"; do
    count=${item%%(*}
    reps=1
    if [[ $item == *"(x"* ]]; then
      reps=${item#*(x}
      reps=${reps%)}
    fi
    if ((SLURM_NODEID < node + reps)); then
      echo "$count"
      return
    fi
    node=$((node + reps))
  done
  echo "${SLURM_NTASKS_PER_NODE:-1}"
}

export RANK="${SLURM_PROCID:?}"
export WORLD_SIZE="${SLURM_NTASKS:?}"
export LOCAL_RANK="${SLURM_LOCALID:?}"
LOCAL_WORLD_SIZE=$(local_world_size)
export LOCAL_WORLD_SIZE
export GROUP_RANK="${SLURM_NODEID:?}"
export NODE_RANK="$GROUP_RANK"
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}"

eaopd_omp_threads "${SLURM_CPUS_PER_TASK:-1}" 1

# Ignore the preemption signals until the trainer installs its handler
# (megatron_eaopd.trainer.preemption): an early signal must not kill a task. One that arrives in
# that window is not lost: the batch script's stop file makes the trainer stop at iteration one.
signals=$(eaopd_preempt_signals)
mapfile -t signal_list <<<"$signals"
for sig in "${signal_list[@]}"; do trap '' "$sig"; done
exec "$EAOPD_PYTHON" -m "$EAOPD_ENTRY" --config "$config" "$@"
