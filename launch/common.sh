# shellcheck shell=bash
# The helpers of the launch scripts, not a script of its own: each sources it from its own directory,
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# so it is found wherever the checkout is (on the TPU workers too: tpu_pod.sh setup ships the whole checkout).
# slurm_gpu.sbatch keeps its own copies: SLURM runs a copy of the batch script from its spool directory, where
# this file is not. usage reads the header of the script that was run ($0); dry and run read its DRY_RUN.

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
dry() { [[ "$DRY_RUN" == 1 ]]; }
quote() {  # ARGS as a shell would read them back: plain words as they are, others in single quotes
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() { if dry; then echo "+ $(quote "$@")"; else "$@"; fi; }  # the command, or in a dry run only shown

help_exit() {  # help_exit ARGS: the usage and exit 0 when -h or --help comes before any --
  local arg
  for arg in "$@"; do
    case "$arg" in
      --) break ;;
      -h|--help) usage; exit 0 ;;
    esac
  done
}

wait_for() {  # the exit status of background job $1, waiting again when a trapped signal interrupts `wait`
  local status
  while :; do
    status=0; wait "$1" || status=$?
    if (( status > 128 )) && kill -0 "$1" 2>/dev/null; then continue; fi  # interrupted; still running
    if (( status > 128 )); then status=0; wait "$1" || status=$?; fi       # it ended meanwhile: its own status
    return "$status"
  done
}
