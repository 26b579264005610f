#!/usr/bin/env bash
# The paper's grid in one command: ImageNet subsets 1, 5, 10 and 20 % x loss modes vanilla, soft and cab (12 runs
# of cab_jax.main; the epochs, 3000/600/300/150, come from the config's subset variant), then one table of their
# final top-1 / top-5 (ROOT/results.md, by launch/collect_results.py).
#
#   # here, one run after another (each restarted when it exits 75, i.e. stopped after saving)
#   launch/sweep_subsets.sh --root=/ckpt/sweep_vim_s -- \
#       --config.data.data_dir=/data/tensorflow_datasets --config.teacher.init_from=/ckpt/deit_s
#   # on a SLURM cluster: 12 jobs of launch/slurm_gpu.sbatch (each requeued on 75), then the table when done
#   launch/sweep_subsets.sh --submit=slurm --sbatch_args="--nodes=2 --partition=gpu" --root=/shared/sweep -- ...
#   launch/sweep_subsets.sh --collect --root=/shared/sweep
#
# Options: --root=DIR (required; run s{PCT}_{MODE} goes to DIR/s{PCT}_{MODE}, e.g. DIR/s10_cab),
# --config=FILE[:variant] (default configs/vim_small.py; configs/vim_tiny.py for DeiT-Ti -> Vim-Ti; the sweep adds
# subset=...,mode=... to the variant), --submit=local|slurm (default local), --subsets="0.01 0.05 0.1 0.2",
# --modes="vanilla soft cab", --sbatch_args="..." (slurm: extra sbatch options), --max_restarts=N (local, per run,
# default 20), --collect (only write the table), --dry_run (or DRY_RUN=1: print every command, python or sbatch,
# instead of running it, and exit 0). Everything after -- goes to every run.
#
# Assumes: run from anywhere, with PYTHON (default: python) having the project installed; the data prepared
# (launch/prepare_data.sh); for --submit=slurm, what launch/slurm_gpu.sbatch assumes (ROOT on a shared
# filesystem). A local run that finishes leaves ROOT/RUN/FINISHED, and a later sweep skips it. Ctrl-C (or SIGTERM)
# stops the current run after it saves, and the sweep with it, with status 75: the same command resumes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
ROOT="" CONFIG="configs/vim_small.py" SUBMIT=local SUBSETS="0.01 0.05 0.1 0.2" MODES="vanilla soft cab"
SBATCH_ARGS="" MAX_RESTARTS=20 COLLECT_ONLY=0
MAIN_ARGS=()
RESUME=75  # cab_jax.main: stopped by SIGTERM/SIGINT after saving a checkpoint; run it again to resume

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, die, dry, quote, run, help_exit, wait_for

run_dir() { echo "$ROOT/s$(awk -v s="$1" 'BEGIN { printf "%g", 100 * s }')_$2"; }  # run_dir 0.1 cab: ROOT/s10_cab
config_for() {  # config_for 0.1 cab: CONFIG:subset=0.1,mode=cab (after the config's own variant, if any)
  if [[ "$CONFIG" == *:* ]]; then echo "$CONFIG,subset=$1,mode=$2"; else echo "$CONFIG:subset=$1,mode=$2"; fi
}

stopping=0
child=""
on_signal() { stopping=1; [[ -z "$child" ]] || kill -TERM "$child" 2>/dev/null || true; }

run_local() {  # run_local SUBSET MODE: one run to the end, restarted on exit 75 unless the sweep is being stopped
  local workdir cmd status restarts=0
  workdir="$(run_dir "$1" "$2")"
  cmd=("$PYTHON" -m cab_jax.main --config="$(config_for "$1" "$2")" --workdir="$workdir" "${MAIN_ARGS[@]}")
  if dry; then echo "+ $(quote "${cmd[@]}")  # again while it exits $RESUME"; return 0; fi
  if [[ -f "$workdir/FINISHED" ]]; then echo "sweep: $workdir finished in an earlier sweep"; return 0; fi
  while :; do
    echo "sweep: $(quote "${cmd[@]}")"
    (cd "$REPO" && exec "${cmd[@]}") &
    child=$!
    status=0; wait_for "$child" || status=$?
    child=""
    if (( status == 0 )); then mkdir -p "$workdir" && touch "$workdir/FINISHED"; return 0; fi
    if (( status != RESUME || stopping )); then return "$status"; fi
    (( restarts < MAX_RESTARTS )) || { echo "sweep: $workdir: $MAX_RESTARTS restarts done" >&2; return "$status"; }
    restarts=$((restarts + 1))
    echo "sweep: $workdir stopped after saving (status $RESUME): restart $restarts/$MAX_RESTARTS"
  done
}

submit_slurm() {  # submit_slurm SUBSET MODE: one job of launch/slurm_gpu.sbatch
  local name workdir sbatch_args=()
  workdir="$(run_dir "$1" "$2")"
  name="cab_$(basename "$workdir")"
  [[ -z "$SBATCH_ARGS" ]] || read -r -a sbatch_args <<<"$SBATCH_ARGS"
  local cmd=(sbatch --parsable --job-name="$name" --output="$ROOT/slurm-%x-%j.out" --chdir="$REPO" "${sbatch_args[@]}"
             "$REPO/launch/slurm_gpu.sbatch" --config="$(config_for "$1" "$2")" --workdir="$workdir" "${MAIN_ARGS[@]}")
  if dry; then echo "+ $(quote "${cmd[@]}")"; return 0; fi
  echo "sweep: submitted $name as job $("${cmd[@]}")"
}

collect() {
  local runs=() subset mode
  for subset in $SUBSETS; do for mode in $MODES; do runs+=("$(run_dir "$subset" "$mode")"); done; done
  local cmd=("$PYTHON" "$REPO/launch/collect_results.py" "${runs[@]}" --out="$ROOT/results.md")
  if dry; then echo "+ $(quote "${cmd[@]}")"; else "${cmd[@]}"; fi
}

help_exit "$@"
while (( $# )); do
  case "$1" in
    --root=*) ROOT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --submit=*) SUBMIT="${1#*=}" ;;
    --subsets=*) SUBSETS="${1#*=}" ;;
    --modes=*) MODES="${1#*=}" ;;
    --sbatch_args=*) SBATCH_ARGS="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --collect) COLLECT_ONLY=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (flags of cab_jax.main go after --; see --help)" ;;
  esac
  shift
done
[[ -n "$ROOT" ]] || die "--root=DIR is required: the runs go to DIR/s{PCT}_{MODE}"
[[ "$SUBMIT" == local || "$SUBMIT" == slurm ]] || die "--submit=$SUBMIT: expected local or slurm"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts=$MAX_RESTARTS: expected a count"
for arg in "${MAIN_ARGS[@]}"; do
  case "$arg" in
    --config=*|--workdir=*) die "$arg: the sweep sets --config and --workdir itself (see --config, --root)" ;;
  esac
done
[[ "$ROOT" == /* ]] || ROOT="$PWD/$ROOT"  # the runs start in the project's root
[[ "$CONFIG" == /* || "$PWD" == "$REPO" || ! -f "${CONFIG%%:*}" ]] || CONFIG="$PWD/$CONFIG"  # named from here

if (( COLLECT_ONLY )); then collect; exit 0; fi
dry || mkdir -p "$ROOT"
if [[ "$SUBMIT" == slurm ]]; then
  for subset in $SUBSETS; do for mode in $MODES; do submit_slurm "$subset" "$mode"; done; done
  echo "# when the jobs are done: $(quote "$0" --collect --root="$ROOT")"
  exit 0
fi
trap on_signal INT TERM
for subset in $SUBSETS; do
  for mode in $MODES; do
    status=0; run_local "$subset" "$mode" || status=$?
    if (( status != 0 )); then
      echo "sweep: stopped at subset $subset, mode $mode, with status $status; the same command resumes" >&2
      exit "$status"
    fi
  done
done
collect
