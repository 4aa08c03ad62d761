# shellcheck shell=bash
# Helpers shared by launch/run_local.sh and launch/slurm/*.sbatch. Source it; it runs nothing.
#
# Settings (environment variables; every one has a default):
#   EAOPD_PYTHON        python to run (default: python3 if on PATH, else python)
#   EAOPD_ENTRY         module run as the trainer (default: megatron_eaopd.cli); tests put a
#                       stand-in here, e.g. tests.launch.standin_trainer
#   EAOPD_CONFIG        config file when none is given as the first argument
#   EAOPD_NPROC_PER_NODE  processes per node for torchrun (default: GPUs seen by nvidia-smi, else 1)
#   EAOPD_DRY_RUN=1     print the command that would run, run nothing

# Print a timestamped launcher message on stderr.
eaopd_log() {
  printf '[eaopd-launch %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

eaopd_die() {
  eaopd_log "error: $*"
  exit 2
}

# eaopd_parse_args ARGS...: sets EAOPD_CONFIG and the array EAOPD_OVERRIDES.
# The first argument is the config file unless it looks like an override (contains '=').
eaopd_parse_args() {
  if [[ $# -gt 0 && $1 != *=* ]]; then
    EAOPD_CONFIG=$1
    shift
  fi
  [[ -n ${EAOPD_CONFIG:-} ]] || eaopd_die "no config: pass CONFIG.yaml as the first argument or set EAOPD_CONFIG"
  [[ -f $EAOPD_CONFIG ]] || eaopd_die "config file not found: $EAOPD_CONFIG (relative paths are taken from $PWD)"
  EAOPD_CONFIG=$(cd "$(dirname "$EAOPD_CONFIG")" && pwd)/$(basename "$EAOPD_CONFIG")
  # shellcheck disable=SC2034  # read by the sourcing script
  EAOPD_OVERRIDES=("$@")
  export EAOPD_CONFIG
}

# Defaults for the python side of every launcher. Existing values always win.
eaopd_python_defaults() {
  if [[ -z ${EAOPD_PYTHON:-} ]]; then
    if command -v python3 >/dev/null 2>&1; then EAOPD_PYTHON=python3; else EAOPD_PYTHON=python; fi
  fi
  : "${EAOPD_ENTRY:=megatron_eaopd.cli}"
  export EAOPD_PYTHON EAOPD_ENTRY
  # Stream logs line by line; the repository is importable without installing it.
  export PYTHONUNBUFFERED=1
  export PYTHONPATH="${EAOPD_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
}

# NCCL / CUDA settings for Megatron tensor parallelism. Existing values always win.
eaopd_nccl_defaults() {
  # Megatron's TP (and sequence parallel) overlap needs kernels issued in order: one hardware
  # queue per device. Required with TP > 1 unless FSDP is used.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Cluster-specific, left to the user: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, ...
}

# Number of GPUs on this node (0 without nvidia-smi).
eaopd_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Processes per node: EAOPD_NPROC_PER_NODE, else the GPU count, else 1.
eaopd_nproc_per_node() {
  if [[ -n ${EAOPD_NPROC_PER_NODE:-} ]]; then
    echo "$EAOPD_NPROC_PER_NODE"
    return
  fi
  local gpus
  gpus=$(eaopd_gpu_count)
  if [[ $gpus -gt 0 ]]; then echo "$gpus"; else echo 1; fi
}

# eaopd_children PID: the PIDs whose parent is PID (from /proc; no procps needed).
eaopd_children() {
  local parent=$1 stat line rest _state ppid pid
  for stat in /proc/[0-9]*/stat; do
    { line=$(<"$stat"); } 2>/dev/null || continue
    pid=${line%% *}
    rest=${line##*) }
    read -r _state ppid _ <<<"$rest"
    if [[ $ppid == "$parent" ]]; then echo "$pid"; fi
  done
}

# eaopd_print_cmd ARGS...: the command on one line, shell-quoted.
eaopd_print_cmd() {
  local out="" arg
  for arg in "$@"; do out+=$(printf '%q ' "$arg"); done
  echo "${out% }"
}

# eaopd_omp_threads CPUS NPROC: OMP_NUM_THREADS=max(1, CPUS / NPROC) unless already set.
eaopd_omp_threads() {
  local cpus=${1:-1} nproc=${2:-1} threads
  [[ -n ${OMP_NUM_THREADS:-} ]] && return 0
  threads=$((cpus / (nproc > 0 ? nproc : 1)))
  export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
}
