#!/usr/bin/env bash
# Run EOPD distillation on this machine with torchrun, from the same config files as the Slurm
# scripts.
#
#   launch/run_local.sh CONFIG.yaml [key.path=value ...]
#   EAOPD_NPROC_PER_NODE=2 launch/run_local.sh configs/tiny-cpu.yaml training.iterations=10
#
# Processes: EAOPD_NPROC_PER_NODE, else one per GPU (nvidia-smi), else 1. Other settings
# (EAOPD_PYTHON, EAOPD_ENTRY, EAOPD_DRY_RUN): see launch/common.sh.
# To stop with a checkpoint, send SIGUSR1 to the training processes (the children of torchrun):
#   pkill -USR1 -P <torchrun pid>
# torchrun itself ignores SIGUSR1; Ctrl-C stops everything without a checkpoint.
set -euo pipefail

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
trap '' "${EAOPD_SIGNAL:-USR1}"
exec "${cmd[@]}"
