#!/usr/bin/env bash
# One Slurm task per node: start torchrun for this node and pass the preemption signals on to the
# training processes. Started by eaopd_torchrun.sbatch through srun; not meant to be run by hand.
#
# usage: torchrun_node.sh CONFIG [dotted.overrides...]
# needs: EAOPD_ROOT, MASTER_ADDR, MASTER_PORT, SLURM_JOB_NUM_NODES, SLURM_NODEID and
#        EAOPD_NPROC_PER_NODE (the batch script works it out once, so every node agrees);
#        EAOPD_PREEMPT_SIGNALS, EAOPD_STOP_FILE, EAOPD_STATUS_DIR (launch/slurm/lib.sh)
#
# Signals: Slurm delivers a step's signal to every process of the step (a preemption's SIGTERM,
# `scancel --signal`), and this shell forwards one it catches to torchrun's children, the training
# processes (megatron_eaopd.trainer.preemption). torchrun must survive them all: it is started with
# the preemption signals ignored and told not to handle them (TORCHELASTIC_SIGNALS_TO_HANDLE), or
# it would kill its workers before they saved. A signal caught before the workers exist is not
# lost: the stop file (written here and by the batch script) makes them stop at iteration one.
#
# Logs: lines of the training processes start with their global rank ("3: ", as srun --label
# writes them in the per-GPU variant; torchrun --tee with a prefix template), every other line of
# this node (torchrun's own, this script's) with "node<K>: ". torchrun also keeps each rank's raw
# output under $EAOPD_LOG_DIR/torchrun-attempt<N>-node<K>/.
#
# Exit status: torchrun's, except that a worker's own status recorded in EAOPD_STATUS_DIR wins
# (torchrun reports every failed worker as 1; a configuration error must stay 2).
set -euo pipefail
# Ignore the preemption signals the batch script exported from the first line: one that arrives
# while this script starts must not end the task (the names are checked again below).
sigs=${EAOPD_PREEMPT_SIGNALS:-}
for sig in ${sigs//,/ }; do trap '' "$sig" 2>/dev/null || true; done

: "${EAOPD_ROOT:?EAOPD_ROOT must be set by the batch script}"
# shellcheck source=launch/common.sh
source "$EAOPD_ROOT/launch/common.sh"

config=${1:?usage: torchrun_node.sh CONFIG [overrides...]}
shift
node=${SLURM_NODEID:?}
signals=$(eaopd_preempt_signals)
mapfile -t signal_list <<<"$signals"
# Until the traps below are set, a preemption signal must not end this shell.
for sig in "${signal_list[@]}"; do trap '' "$sig"; done

# Every line of this node gets a prefix; the filter ignores the signals (it must outlive them).
exec > >(
  for sig in "${signal_list[@]}"; do trap '' "$sig"; done
  eaopd_prefix_lines "node$node: "
) 2>&1
filter_pid=$!

nproc=$(eaopd_nproc_per_node)
eaopd_omp_threads "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$nproc}}" "$nproc"

eaopd_torchrun_signals "${signal_list[@]}"
# shellcheck disable=SC2016  # a template torchrun fills in, not a shell expansion
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='${rank}: '
rank_logs=${EAOPD_LOG_DIR:-/tmp}/torchrun-attempt${EAOPD_ATTEMPT:-0}-node$node

cmd=(
  "$EAOPD_PYTHON" -m torch.distributed.run
  --nnodes="${SLURM_JOB_NUM_NODES:?}"
  --node-rank="$node"
  --nproc-per-node="$nproc"
  --master-addr="${MASTER_ADDR:?}"
  --master-port="${MASTER_PORT:?}"
  --max-restarts=0
  --log-dir="$rank_logs"
  --tee=3
  -m "$EAOPD_ENTRY" --config "$config" "$@"
)
eaopd_log "node $node/${SLURM_JOB_NUM_NODES} on $(hostname -s): $(eaopd_print_cmd "${cmd[@]}")"

# The subshell ignores the signals before exec: torchrun and the workers it starts inherit that
# (the workers catch them once their handler is installed).
(
  for sig in "${signal_list[@]}"; do trap '' "$sig"; done
  exec "${cmd[@]}"
) &
torchrun_pid=$!

# shellcheck disable=SC2317  # called through trap
forward() {
  local sig=$1 pid sent=()
  if [[ -n ${EAOPD_STOP_FILE:-} ]]; then : >>"$EAOPD_STOP_FILE"; fi
  for pid in $(eaopd_children "$torchrun_pid"); do
    if kill -s "$sig" "$pid" 2>/dev/null; then sent+=("$pid"); fi
  done
  eaopd_log "node $node: SIG$sig forwarded to training processes: ${sent[*]:-none (not started yet: the stop file stops them at their first iteration)}"
}
for sig in "${signal_list[@]}"; do
  # shellcheck disable=SC2064  # expand now: one trap per signal
  trap "forward $sig" "$sig"
done

# wait also returns when a trapped signal arrives (status 128+N, not torchrun's): go on waiting
# while torchrun lives, then take its own status (kept by bash even when torchrun ended, and was
# reaped, while the trap ran).
while kill -0 "$torchrun_pid" 2>/dev/null; do
  wait "$torchrun_pid" || true
done
rc=0
wait "$torchrun_pid" || rc=$?

# torchrun turns every worker failure into 1: take this node's workers' own statuses instead.
if [[ $rc != 0 && -n ${EAOPD_STATUS_DIR:-} ]]; then
  worst=0
  for ((local_rank = 0; local_rank < nproc; local_rank++)); do
    file=$EAOPD_STATUS_DIR/rank$((node * nproc + local_rank))
    [[ -f $file ]] || continue
    read -r _ code _ <"$file" || continue
    if [[ $code =~ ^[0-9]+$ ]] && ((code > worst)); then worst=$code; fi
  done
  if ((worst > 0 && worst != rc)); then
    eaopd_log "node $node: torchrun exited $rc; the training processes exited $worst: exit $worst"
    rc=$worst
  fi
fi
# Let the prefix filter write the last lines before the step ends.
exec >&- 2>&-
wait "$filter_pid" 2>/dev/null || true
exit "$rc"
