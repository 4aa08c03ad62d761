# shellcheck shell=bash
# Helpers shared by launch/run_local.sh and launch/slurm/*.sbatch. Source it; it runs nothing.
#
# Settings (environment variables; every one has a default):
#   EAOPD_PYTHON        python to run (default: python3 if on PATH, else python)
#   EAOPD_ENTRY         module run as the trainer (default: megatron_eaopd.cli); tests put a
#                       stand-in here, e.g. tests.launch.standin_trainer
#   EAOPD_CONFIG        config file when none is given as the first argument
#   EAOPD_NPROC_PER_NODE  processes per node for torchrun (default: the GPUs of the allocation,
#                       see eaopd_nproc_per_node; required for CPU-only Slurm jobs)
#   EAOPD_PREEMPT_SIGNALS  signals that make the trainer save a checkpoint and stop, comma list
#                       (default: USR1,TERM; the trainer reads the same variable)
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
# The config file comes first, as `--config FILE` (the trainer's form), `--config=FILE` or FILE
# alone; a first argument holding '=' is an override unless it is a file (in a folder named
# lr=1e-4).
eaopd_parse_args() {
  if [[ $# -gt 0 && $1 == --config ]]; then
    [[ $# -gt 1 ]] || eaopd_die "--config needs a file"
    EAOPD_CONFIG=$2
    shift 2
  elif [[ $# -gt 0 && $1 == --config=* ]]; then
    EAOPD_CONFIG=${1#--config=}
    shift
  elif [[ $# -gt 0 && ($1 != *=* || -f $1) ]]; then
    EAOPD_CONFIG=$1
    shift
  fi
  [[ -n ${EAOPD_CONFIG:-} ]] || eaopd_die "no config: pass CONFIG.yaml as the first argument or set EAOPD_CONFIG"
  [[ -f $EAOPD_CONFIG ]] || eaopd_die "config file not found: $EAOPD_CONFIG (relative paths are taken from $PWD)"
  EAOPD_CONFIG=$(cd "$(dirname "$EAOPD_CONFIG")" >/dev/null && pwd)/$(basename "$EAOPD_CONFIG")
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

# The preemption signals as names without the SIG prefix, one per line (from
# EAOPD_PREEMPT_SIGNALS, default USR1,TERM; the older EAOPD_SIGNAL is honoured when it is the
# only one set). Callers export the list as EAOPD_PREEMPT_SIGNALS, so the trainer catches it too.
eaopd_preempt_signals() {
  local spec=${EAOPD_PREEMPT_SIGNALS:-${EAOPD_SIGNAL:-USR1,TERM}} item name
  local -a items
  IFS=', ' read -r -a items <<<"$spec"
  for item in "${items[@]}"; do
    [[ -n $item ]] || continue
    item=${item^^}
    item=${item#SIG}
    # a number (10, 15: the trainer takes them too) becomes its name, which the scripts compare
    if [[ $item =~ ^[0-9]+$ ]] && name=$(kill -l "$item" 2>/dev/null); then item=$name; fi
    kill -l "$item" >/dev/null 2>&1 || eaopd_die "EAOPD_PREEMPT_SIGNALS: unknown signal '$item' (e.g. USR1,TERM)"
    echo "$item"
  done
}

# eaopd_torchrun_signals SIG...: tell torchrun to handle SIGTERM, SIGINT, SIGHUP and SIGQUIT but
# the given preemption signals. torchrun handles a signal by killing its workers (SIGKILL after
# 30 s); left out, a signal keeps the disposition torchrun started with (ignored, in our scripts)
# and the workers get their time to save. PET_SIGNALS_TO_HANDLE is torchrun's
# --signals-to-handle (which overwrites TORCHELASTIC_SIGNALS_TO_HANDLE); older versions read only
# the latter.
eaopd_torchrun_signals() {
  local sig handled=()
  for sig in TERM INT HUP QUIT; do
    [[ " $* " == *" $sig "* ]] || handled+=("SIG$sig")
  done
  TORCHELASTIC_SIGNALS_TO_HANDLE=$(
    IFS=,
    echo "${handled[*]}"
  )
  PET_SIGNALS_TO_HANDLE=$TORCHELASTIC_SIGNALS_TO_HANDLE
  export TORCHELASTIC_SIGNALS_TO_HANDLE PET_SIGNALS_TO_HANDLE
}

# eaopd_wait_child PID: wait for a background child of this shell and return its own exit
# status. wait also returns when a trapped signal arrives (128+N, not the child's): keep waiting
# while the child lives; bash keeps its status even when it ended, and was reaped, while a trap
# ran. Call as `rc=0; eaopd_wait_child "$pid" || rc=$?` under set -e.
eaopd_wait_child() {
  while kill -0 "$1" 2>/dev/null; do
    wait "$1" || true
  done
  wait "$1"
}

# eaopd_count_items LIST: the number of comma-separated non-empty entries ("0,1,3" -> 3).
eaopd_count_items() {
  local item n=0
  local -a items
  IFS=, read -r -a items <<<"${1:-}"
  for item in "${items[@]}"; do [[ -n ${item// /} ]] && n=$((n + 1)); done
  echo "$n"
}

# eaopd_count_visible LIST: the devices CUDA takes from a CUDA_VISIBLE_DEVICES value: the
# entries (indices or GPU-/MIG- UUIDs) before the first that starts with '-' ("0,1,-1,3" -> 2).
eaopd_count_visible() {
  local item n=0
  local -a items
  IFS=, read -r -a items <<<"${1:-}"
  for item in "${items[@]}"; do
    item=${item// /}
    [[ -n $item ]] || continue
    [[ $item != -* ]] || break
    n=$((n + 1))
  done
  echo "$n"
}

# eaopd_gpus_per_node_spec SPEC: GPUs per node from Slurm's --gpus-per-node value ("8",
# "a100:8", "a100:4,v100:2" -> 6); 0 when it names none.
eaopd_gpus_per_node_spec() {
  local item count n=0
  local -a items
  IFS=, read -r -a items <<<"${1:-}"
  for item in "${items[@]}"; do
    count=${item##*:}
    [[ $count =~ ^[0-9]+$ ]] && n=$((n + count))
  done
  echo "$n"
}

# GPUs of this allocation per node, and where the number came from ("N SOURCE"); nothing when
# the allocation has none: SLURM_GPUS_PER_NODE (--gpus-per-node, the same on every node), else
# SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES (as set by Slurm or by hand).
eaopd_allocated_gpus() {
  local n
  if [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    n=$(eaopd_gpus_per_node_spec "$SLURM_GPUS_PER_NODE")
    if ((n > 0)); then echo "$n SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE"; return; fi
  fi
  if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]] && ((SLURM_GPUS_ON_NODE > 0)); then
    echo "$SLURM_GPUS_ON_NODE SLURM_GPUS_ON_NODE"
    return
  fi
  # CUDA reads the list up to its first invalid entry: "-1" (or "") hides every GPU
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
    n=$(eaopd_count_visible "$CUDA_VISIBLE_DEVICES")
    if ((n > 0)); then echo "$n CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; fi
  fi
}

# Processes per node for torchrun, printed on stdout (the reason goes to the log on stderr):
#   1. EAOPD_NPROC_PER_NODE when set (a positive integer);
#   2. the GPUs of the allocation (eaopd_allocated_gpus);
#   3. inside a Slurm job without GPUs: an error (say EAOPD_NPROC_PER_NODE=N for a CPU run);
#   4. outside Slurm: the GPUs nvidia-smi lists (an error when nvidia-smi fails), or 1 process
#      on a machine without nvidia-smi.
# The batch script computes it once and exports it, so every node starts the same number.
eaopd_nproc_per_node() {
  local found out
  if [[ -n ${EAOPD_NPROC_PER_NODE:-} ]]; then
    [[ $EAOPD_NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
      eaopd_die "EAOPD_NPROC_PER_NODE=$EAOPD_NPROC_PER_NODE is not a positive integer"
    echo "$EAOPD_NPROC_PER_NODE"
    return
  fi
  found=$(eaopd_allocated_gpus)
  if [[ -n $found ]]; then
    eaopd_log "processes per node: ${found%% *} (from ${found#* })"
    echo "${found%% *}"
    return
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    eaopd_die "cannot tell how many processes to start per node: the job has no GPUs" \
      "(SLURM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES are unset or 0)." \
      "Ask for GPUs (sbatch --gpus-per-node=N) or, for a CPU-only run, set EAOPD_NPROC_PER_NODE=N"
  fi
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then # set, naming no GPU ("", "-1", NoDevFiles)
    eaopd_log "processes per node: 1 (CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every" \
      "GPU: a CPU run; EAOPD_NPROC_PER_NODE=N for more)"
    echo 1
    return
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    eaopd_log "processes per node: 1 (no nvidia-smi: a CPU machine; EAOPD_NPROC_PER_NODE=N for more)"
    echo 1
    return
  fi
  if ! out=$(nvidia-smi --list-gpus 2>&1); then
    eaopd_die "nvidia-smi failed, so the GPUs cannot be counted: ${out//$'\n'/ }." \
      "Fix the driver, or set EAOPD_NPROC_PER_NODE=N (or CUDA_VISIBLE_DEVICES)"
  fi
  found=$(grep -c '^GPU' <<<"$out" || true)
  ((found > 0)) || eaopd_die "nvidia-smi lists no GPU; set EAOPD_NPROC_PER_NODE=N for a CPU run"
  eaopd_log "processes per node: $found (GPUs listed by nvidia-smi)"
  echo "$found"
}

# eaopd_prefix_lines PREFIX: copy stdin to stdout line by line, putting PREFIX before every
# line that does not already start with a rank label ("12: ", as srun --label and torchrun's
# prefix template write them).
eaopd_prefix_lines() {
  local prefix=$1 line
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^[0-9]+:\  ]]; then
      printf '%s\n' "$line"
    else
      printf '%s%s\n' "$prefix" "$line"
    fi
  done
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
