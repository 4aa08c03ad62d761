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
# To stop with a checkpoint, send SIGTERM or SIGUSR1 to the training processes (the children of
# torchrun):   pkill -TERM -P <torchrun pid>
# torchrun itself ignores those signals; Ctrl-C stops everything without a checkpoint.
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
for sig in "${signal_list[@]}"; do trap '' "$sig"; done
exec "${cmd[@]}"
