#!/usr/bin/env bash
# One Slurm task per node: start torchrun for this node and pass the pre-timeout signal on to the
# training processes. Started by eaopd_torchrun.sbatch through srun; not meant to be run by hand.
#
# usage: torchrun_node.sh CONFIG [dotted.overrides...]
# needs: EAOPD_ROOT, MASTER_ADDR, MASTER_PORT, SLURM_JOB_NUM_NODES, SLURM_NODEID
#        (EAOPD_NPROC_PER_NODE, EAOPD_PYTHON, EAOPD_ENTRY, EAOPD_SIGNAL: see launch/common.sh)
#
# Signals: torchrun dies on SIGUSR1 (default action), so it is started with the signal ignored,
# and this shell forwards the signal to torchrun's children, the training processes, which catch
# it (megatron_eaopd.trainer.preemption). Slurm may also deliver it to every process of the step
# directly; a second copy is harmless.
set -euo pipefail

: "${EAOPD_ROOT:?EAOPD_ROOT must be set by the batch script}"
# shellcheck source=launch/common.sh
source "$EAOPD_ROOT/launch/common.sh"

config=${1:?usage: torchrun_node.sh CONFIG [overrides...]}
shift
signal_name=${EAOPD_SIGNAL:-USR1}
nproc=$(eaopd_nproc_per_node)
eaopd_omp_threads "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$nproc}}" "$nproc"

cmd=(
  "$EAOPD_PYTHON" -m torch.distributed.run
  --nnodes="${SLURM_JOB_NUM_NODES:?}"
  --node-rank="${SLURM_NODEID:?}"
  --nproc-per-node="$nproc"
  --master-addr="${MASTER_ADDR:?}"
  --master-port="${MASTER_PORT:?}"
  --max-restarts=0
  -m "$EAOPD_ENTRY" --config "$config" "$@"
)
eaopd_log "node ${SLURM_NODEID}/${SLURM_JOB_NUM_NODES} on $(hostname -s): $(eaopd_print_cmd "${cmd[@]}")"

# The subshell ignores the signal before exec: torchrun and the workers it starts inherit that.
(
  trap '' "$signal_name"
  exec "${cmd[@]}"
) &
torchrun_pid=$!

# shellcheck disable=SC2317  # called through trap
forward() {
  local pid sent=()
  for pid in $(eaopd_children "$torchrun_pid"); do
    if kill -s "$signal_name" "$pid" 2>/dev/null; then sent+=("$pid"); fi
  done
  eaopd_log "node ${SLURM_NODEID}: SIG${signal_name} forwarded to training processes: ${sent[*]:-none}"
}
trap forward "$signal_name"

rc=0
while :; do
  rc=0
  wait "$torchrun_pid" || rc=$?
  # wait also returns when a trapped signal arrives; go on waiting while torchrun lives.
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$rc"
