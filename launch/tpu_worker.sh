#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: one detached run of `python -m cab_jax.main` per TPU VM worker, which
# outlives the ssh session that started it, with its log, pid and exit status in RUN_DIR.
#
#   launch/tpu_worker.sh start MAIN_FLAGS...  start the run in the background (waits for a previous one to end)
#   launch/tpu_worker.sh watch                print the log as it grows until the run ends; exit with its status
#                                             (69 when it ended without one: the worker restarted)
#   launch/tpu_worker.sh stop                 SIGTERM the run, wait for it: it saves a checkpoint and exits 75
#   launch/tpu_worker.sh status               print whether it runs, or its exit status
#
# Assumes: run from the project's root (tpu_pod.sh does `cd ~/cab_jax`); PYTHON (default python3) has the project
# installed; RUN_DIR (default ~/cab_jax_run) is on the worker's own disk. --dry_run (or DRY_RUN=1) prints the
# command `start` would run and exits 0. Exit statuses of the run: 0 finished, 75 stopped and saved (run again to
# resume), 2 usage error, anything else a failure; `watch` exits with the same.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
RUN_DIR="${RUN_DIR:-$HOME/cab_jax_run}"
DRY_RUN="${DRY_RUN:-0}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-600}"  # how long `stop` and `start` wait for a run to save and exit

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, die, dry, quote, run, help_exit, wait_for

alive() { [[ -f "$RUN_DIR/pid" ]] && kill -0 "$(cat "$RUN_DIR/pid")" 2>/dev/null; }

wait_gone() {  # wait up to STOP_TIMEOUT_S for the current run to exit; fails if it does not
  local waited=0
  while alive; do
    (( waited < STOP_TIMEOUT_S )) || { echo "tpu_worker: run $(cat "$RUN_DIR/pid") still alive" >&2; return 1; }
    sleep 2; waited=$((waited + 2))
  done
}

supervise() {  # runs detached: main in the background, SIGTERM forwarded to it, its status written at the end
  local pid status
  "$PYTHON" -m cab_jax.main "$@" >"$RUN_DIR/log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$RUN_DIR/pid"
  trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
  status=0; wait_for "$pid" || status=$?
  echo "$status" >"$RUN_DIR/status"
}

start() {
  if dry; then
    printf '+ %q -m cab_jax.main' "$PYTHON"; printf ' %q' "$@"; printf '  # detached, log in %s/log\n' "$RUN_DIR"
    return 0
  fi
  mkdir -p "$RUN_DIR"
  wait_gone
  rm -f "$RUN_DIR/status" "$RUN_DIR/pid"
  [[ -f "$RUN_DIR/log" ]] && mv "$RUN_DIR/log" "$RUN_DIR/log.previous"
  setsid nohup "$0" _supervise "$@" >/dev/null 2>&1 </dev/null &
  local waited=0
  until [[ -f "$RUN_DIR/pid" ]]; do  # started once the pid is written
    (( waited < 100 )) || { echo "tpu_worker: the run did not start" >&2; return 1; }
    sleep 0.1; waited=$((waited + 1))
  done
  echo "tpu_worker $(hostname): started pid $(cat "$RUN_DIR/pid"), log $RUN_DIR/log"
}

watch() {
  [[ -f "$RUN_DIR/pid" ]] || { echo "tpu_worker: no run started in $RUN_DIR" >&2; return 1; }
  tail -n +1 -F "$RUN_DIR/log" 2>/dev/null &
  local tail_pid=$! gone=0
  while [[ ! -f "$RUN_DIR/status" ]]; do
    if ! alive; then  # the supervisor writes the status right after main exits; a missing one means it died
      gone=$((gone + 1))
      (( gone < 10 )) || break
    fi
    sleep 1
  done
  sleep 1; kill "$tail_pid" 2>/dev/null || true
  if [[ ! -f "$RUN_DIR/status" ]]; then
    echo "tpu_worker: the run ended without an exit status (the worker restarted?)" >&2
    return 69  # tpu_pod.sh restarts the run on it
  fi
  local status; status=$(cat "$RUN_DIR/status")
  echo "tpu_worker $(hostname): cab_jax.main exited with status $status"
  return "$status"
}

stop() {
  if alive; then
    kill -TERM "$(cat "$RUN_DIR/pid")"
    wait_gone
    for _ in 1 2 3 4 5; do [[ -f "$RUN_DIR/status" ]] && break; sleep 1; done  # the supervisor writes it next
    echo "tpu_worker $(hostname): stopped, status $(cat "$RUN_DIR/status" 2>/dev/null || echo unknown)"
  fi
}

status() {
  if alive; then echo "running (pid $(cat "$RUN_DIR/pid"))"
  elif [[ -f "$RUN_DIR/status" ]]; then echo "exited with status $(cat "$RUN_DIR/status")"
  else echo "no run"; fi
}

[[ "${1:-}" == --dry_run ]] && { DRY_RUN=1; shift; }
command="${1:-}"
shift || true
case "$command" in
  start) start "$@" ;;
  watch) watch ;;
  stop) stop ;;
  status) status ;;
  _supervise) supervise "$@" ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
