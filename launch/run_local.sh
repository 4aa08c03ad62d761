#!/usr/bin/env bash
# Run EOPD distillation on this machine with torchrun, from the same config files as the Slurm
# scripts.
#
#   launch/run_local.sh CONFIG.yaml [key.path=value ...]
#   EAOPD_NPROC_PER_NODE=2 launch/run_local.sh configs/tiny-cpu.yaml training.iterations=10
#
# Processes: EAOPD_NPROC_PER_NODE, else CUDA_VISIBLE_DEVICES, else one per GPU that nvidia-smi
# lists (an error when nvidia-smi fails), else 1 on a machine without nvidia-smi. Other settings
# (EAOPD_PYTHON, EAOPD_ENTRY, EAOPD_PREEMPT_SIGNALS, EAOPD_DRY_RUN): see launch/common.sh.
# To stop with a checkpoint, send SIGTERM or SIGUSR1 to this script (kill <pid>, a container
# stop) or to the training processes: it writes a stop file the trainer polls and forwards the
# signal to torchrun's workers (torchrun itself ignores them). Ctrl-C (SIGINT) stops everything
# without a checkpoint.
# Exit status: 0 finished, 75 stopped early after its save (run again to resume), 2 a
# configuration error, else the failure's (the workers' own statuses, not torchrun's 1).
set -euo pipefail
unset CDPATH # `cd DIR` would print DIR into $(cd DIR && pwd)

EAOPD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export EAOPD_ROOT
# shellcheck source=launch/common.sh
source "$EAOPD_ROOT/launch/common.sh"

eaopd_parse_args "$@"
eaopd_python_defaults
eaopd_nccl_defaults
nproc=$(eaopd_nproc_per_node)
eaopd_omp_threads "$(nproc 2>/dev/null || echo 1)" "$nproc"

cmd=(
  "$EAOPD_PYTHON" -m torch.distributed.run
  --standalone --nnodes=1 --nproc-per-node="$nproc" --max-restarts=0
  -m "$EAOPD_ENTRY" --config "$EAOPD_CONFIG" "${EAOPD_OVERRIDES[@]}"
)
if [[ ${EAOPD_DRY_RUN:-0} == 1 ]]; then
  eaopd_print_cmd "${cmd[@]}"
  exit 0
fi
eaopd_log "$(eaopd_print_cmd "${cmd[@]}")"
# torchrun must neither die of a preemption signal nor kill its workers on one: ignore them
# (the workers install their own handler) and keep them out of torchrun's handled signals.
signals=$(eaopd_preempt_signals)
mapfile -t signal_list <<<"$signals"
EAOPD_PREEMPT_SIGNALS=$(
  IFS=,
  echo "${signal_list[*]}"
)
export EAOPD_PREEMPT_SIGNALS
eaopd_torchrun_signals "${signal_list[@]}"
# the trainer polls the stop file and records how each rank ended in the status folder
state=$(mktemp -d "${TMPDIR:-/tmp}/eaopd-local.XXXXXX")
torchrun_pid="" interrupted=0
# shellcheck disable=SC2317  # called through trap
cleanup() {
  # a script dying of a signal must not leave torchrun and its workers running without it
  if [[ -n $torchrun_pid ]]; then kill -s INT "$torchrun_pid" 2>/dev/null || true; fi
  rm -rf "$state"
}
trap cleanup EXIT
export EAOPD_STOP_FILE=$state/stop EAOPD_STATUS_DIR=$state/status
mkdir -p "$EAOPD_STATUS_DIR"

# Traps first, so that no signal finds the script without one. Preemption signals: the stop
# file, and the signal forwarded to torchrun's workers (each saves a checkpoint).
# shellcheck disable=SC2317  # called through trap
forward() {
  local sig=$1 pid sent=()
  : >>"$EAOPD_STOP_FILE"
  [[ -n $torchrun_pid ]] || return 0
  for pid in $(eaopd_children "$torchrun_pid"); do
    if kill -s "$sig" "$pid" 2>/dev/null; then sent+=("$pid"); fi
  done
  eaopd_log "SIG$sig: wrote the stop file; forwarded to the training processes: ${sent[*]:-none yet}"
}
# Other terminating signals stop torchrun, which stops its workers (no checkpoint). Ctrl-C
# reaches torchrun from the terminal as well: it gets the script's copy only if it is still
# there 3 s later (a second SIGINT would cut its shutdown short).
# shellcheck disable=SC2317  # called through trap
stop_torchrun() {
  [[ -n $torchrun_pid ]] || exit 130
  if [[ $1 == INT ]]; then
    interrupted=1
    (sleep 3 && kill -s INT "$torchrun_pid" 2>/dev/null) &
  else
    kill -s "$1" "$torchrun_pid" 2>/dev/null || true
  fi
}
for sig in "${signal_list[@]}"; do
  # shellcheck disable=SC2064  # expand now: one trap per signal
  trap "forward $sig" "$sig"
done
for sig in INT TERM HUP QUIT USR1; do
  [[ " ${signal_list[*]} " != *" $sig "* ]] || continue
  if [[ $sig == USR1 ]]; then # not caught by the workers (it would kill them): the stop file
    trap ': >>"$EAOPD_STOP_FILE"' USR1
  else
    # shellcheck disable=SC2064  # expand now: one trap per signal
    trap "stop_torchrun $sig" "$sig"
  fi
done

# The subshell ignores the preemption signals before exec: torchrun and the workers it starts
# inherit that (the workers catch them once their handler is installed).
(
  trap - INT TERM HUP QUIT # the defaults (a script's background job would ignore Ctrl-C)
  for sig in "${signal_list[@]}"; do trap '' "$sig"; done
  exec "${cmd[@]}"
) &
torchrun_pid=$!

rc=0
eaopd_wait_child "$torchrun_pid" || rc=$? # through the trapped signals
stopped=0 worst=0
for file in "$EAOPD_STATUS_DIR"/rank*; do
  [[ -f $file ]] || continue
  read -r verdict code _ <"$file" || continue
  [[ $verdict != stopped ]] || stopped=1
  if [[ $code =~ ^[0-9]+$ ]] && ((code > worst)); then worst=$code; fi
done
torchrun_pid="" # ended: nothing for cleanup to stop
if [[ $rc != 0 ]] && ((interrupted)); then
  eaopd_log "interrupted (Ctrl-C): stopped without a checkpoint; earlier saves stay (exit 130)"
  rc=130
elif [[ $rc != 0 ]]; then
  # torchrun turns every worker failure into 1: the workers' own statuses say more
  if ((worst > 0 && worst != rc)); then rc=$worst; fi
  eaopd_log "the training processes failed: exit $rc"
elif ((stopped)); then
  eaopd_log "stopped early after saving a checkpoint: run the same command again to resume (exit 75)"
  rc=75
fi
exit "$rc"
