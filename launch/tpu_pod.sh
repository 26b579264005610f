#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one JAX process per worker) with the project's one entry point.
#
#   launch/tpu_pod.sh up --name=cab-v4 --zone=us-central2-b --accelerator_type=v4-32 \
#       --version=tpu-ubuntu2204-base [--spot] [--queued] -- \
#       --config=configs/vim_small.py:subset=0.1 --workdir=gs://BUCKET/vim_s_10 \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.teacher.init_from=gs://BUCKET/deit_s
#   launch/tpu_pod.sh logs   --name=cab-v4 --zone=us-central2-b     # re-attach to worker 0's log
#   launch/tpu_pod.sh delete --name=cab-v4 --zone=us-central2-b [--queued]
#
# Commands:
#   up      create, setup, then run
#   create  create the slice, or reuse the one of that name (a preempted one is deleted and created again);
#           --queued asks through a queued resource (the node gets the same name), --spot for Spot capacity,
#           --reserved for a reservation, --valid_until=DURATION (queued only, e.g. 6h) to stop waiting
#   setup   copy this checkout (HEAD plus uncommitted changes to tracked files) to every worker and install it
#   run     start `python -m cab_jax.main FLAGS --jax_distributed` on every worker (FLAGS: everything after --),
#           stream worker 0's log, and start again, resuming from the workdir's last checkpoint, when the run
#           exits 75 (stopped by SIGTERM after saving: preemption, maintenance) or the slice was preempted (then
#           it is created and set up again first); at most --max_restarts times (default 20). Exit 0: finished.
#   logs    stream worker 0's log until the run ends; exit with its status
#   stop    SIGTERM the run on every worker: it saves a checkpoint and exits 75 (`run` again resumes)
#   delete  stop, then delete the slice (and its queued resource with --queued)
# Options: --name, --zone (always), --project (else gcloud's default), --accelerator_type and --version (the
# runtime version; create/up), --data_disk=projects/P/zones/Z/disks/D (attached read-only to every worker, mounted
# at /mnt/disks/data), --python_version (default 3.12), --dry_run (or DRY_RUN=1): print every command (gcloud, git,
# and the python command line inside the ssh commands) instead of running it, and exit 0.
#
# Assumes: gcloud installed and logged in, allowed to create TPUs in the zone, and `ssh-add
# ~/.ssh/google_compute_engine` done (gcloud needs the key in an agent for --worker=all); git (setup); the
# runtime image has curl (uv, which installs Python and the project, comes from astral.sh); the workers reach
# PyPI. The workdir and the data are the same path on every worker: gs:// (gcsfs is installed; every worker
# writes its part of each checkpoint, so a local workdir does not work) or a disk from --data_disk. Prepare the
# data first (launch/prepare_data.sh; docs/running_at_scale.md). Exit statuses of cab_jax.main: 0 finished,
# 75 stopped after saving (resume me), 2 usage error, anything else a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
COMMAND="" NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" DATA_DISK="" VALID_UNTIL=""
SPOT=0 QUEUED=0 RESERVED=0 MAX_RESTARTS=20 PYTHON_VERSION=3.12
POLL_S="${POLL_S:-30}"
MAIN_ARGS=()
PREEMPTED_STATES=" PREEMPTED TERMINATED SUSPENDING SUSPENDED FAILED "  # node or queued-resource states: recreate
VANISHED=69  # launch/tpu_worker.sh watch: the run ended without an exit status (the worker restarted)

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, die, dry, quote, run, help_exit, wait_for

gcloud_tpus() {  # gcloud compute tpus ARGS --zone [--project]
  local args=(gcloud compute tpus "$@" --zone="$ZONE")
  [[ -z "$PROJECT" ]] || args+=(--project="$PROJECT")
  run "${args[@]}"
}

query() {  # a describe that prints one field, or NOT_FOUND; in a dry run only shown
  if dry; then
    echo "# a slice found by this is reused: $(quote gcloud compute tpus "$@" --zone="$ZONE")" >&2
    echo NOT_FOUND
    return
  fi
  gcloud_tpus "$@" 2>/dev/null || echo NOT_FOUND
}

slice_state() {  # the node's state (READY, CREATING, PREEMPTED...), the queued resource's while it has no node
  if (( QUEUED )); then
    local queued; queued=$(query queued-resources describe "$NAME" --format='value(state.state)')
    [[ "$queued" == ACTIVE ]] || { echo "$queued"; return; }
  fi
  query tpu-vm describe "$NAME" --format='value(state)'
}

wait_ready() {
  dry && return 0
  local state
  while state=$(slice_state); [[ "$state" != READY ]]; do
    [[ "$PREEMPTED_STATES NOT_FOUND " != *" $state "* ]] || { echo "error: $NAME is $state" >&2; exit 1; }
    echo "tpu_pod: $NAME is $state; waiting for READY"
    sleep "$POLL_S"
  done
}

delete_slice() {
  if (( QUEUED )); then gcloud_tpus queued-resources delete "$NAME" --force --quiet
  else gcloud_tpus tpu-vm delete "$NAME" --quiet; fi
}

create() {
  local state; state=$(slice_state)
  if [[ "$state" != NOT_FOUND ]]; then
    if [[ "$PREEMPTED_STATES" != *" $state "* ]]; then echo "tpu_pod: reusing $NAME ($state)"; wait_ready; return; fi
  fi
  [[ -n "$ACCELERATOR_TYPE" && -n "$VERSION" ]] || die "creating $NAME needs --accelerator_type and --version"
  if [[ "$state" != NOT_FOUND ]]; then
    echo "tpu_pod: $NAME is $state: deleting it, to create it again"
    delete_slice
  fi
  local extra=()
  (( SPOT )) && extra+=(--spot)
  (( RESERVED )) && extra+=(--reserved)
  [[ -z "$DATA_DISK" ]] || extra+=(--data-disk="source=$DATA_DISK,mode=read-only")
  if (( QUEUED )); then
    [[ -z "$VALID_UNTIL" ]] || extra+=(--valid-until-duration="$VALID_UNTIL")
    gcloud_tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$VERSION" "${extra[@]}"
  else
    gcloud_tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${extra[@]}"
  fi
  wait_ready
}

setup() {
  local rev="HEAD" tarball="${TMPDIR:-/tmp}/cab_jax_$NAME.tar.gz"
  dry || rev=$(git -C "$REPO" stash create)  # a commit of the uncommitted changes to tracked files, or nothing
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" "${rev:-HEAD}"
  gcloud_tpus tpu-vm scp "$tarball" "$NAME:cab_jax.tar.gz" --worker=all
  # shellcheck disable=SC2016  # $HOME and ~ expand on the workers
  local install='set -e
if [ -f ~/cab_jax_run/pid ] && kill -0 "$(cat ~/cab_jax_run/pid)" 2>/dev/null; then
  echo "a run is going on $(hostname): launch/tpu_pod.sh stop first" >&2; exit 1; fi
rm -rf ~/cab_jax && mkdir -p ~/cab_jax && tar -xzf ~/cab_jax.tar.gz -C ~/cab_jax
[ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
~/.local/bin/uv venv --quiet --allow-existing --python '"$PYTHON_VERSION"' ~/cab_jax_venv
~/.local/bin/uv pip install --quiet --python ~/cab_jax_venv/bin/python "$HOME/cab_jax[tpu]" gcsfs'
  [[ -z "$DATA_DISK" ]] || install+='
sudo mkdir -p /mnt/disks/data && (mountpoint -q /mnt/disks/data || sudo mount -o ro,noload /dev/sdb /mnt/disks/data)'
  gcloud_tpus tpu-vm ssh "$NAME" --worker=all --command="$install"
}

watch() { gcloud_tpus tpu-vm ssh "$NAME" --worker=0 --command="cd ~/cab_jax && launch/tpu_worker.sh watch"; }

run_main() {
  local args=("${MAIN_ARGS[@]}") flags status state restarts=0 reattached
  [[ " ${args[*]} " == *" --config="* ]] || die "run needs the flags of cab_jax.main after --, with --config=..."
  [[ " ${args[*]} " == *" --workdir="* ]] || die "run needs --workdir=... (gs://BUCKET/PATH) after --"
  [[ " ${args[*]} " == *" --workdir=gs://"* ]] ||
    echo "tpu_pod: warning: the workdir is not gs://: every worker must see the same directory" >&2
  [[ " ${args[*]} " == *" --jax_distributed "* ]] || args+=(--jax_distributed)
  flags=$(printf ' %q' "${args[@]}")
  while :; do
    gcloud_tpus tpu-vm ssh "$NAME" --worker=all \
      --command="cd ~/cab_jax && PYTHON=~/cab_jax_venv/bin/python launch/tpu_worker.sh start$flags"
    status=0; watch || status=$?
    if dry; then
      echo "# exit status 0: finished. 75 (stopped after saving), $VANISHED (a worker restarted) or a preempted slice:"
      echo "# create + setup again if it was preempted, then start and watch again (at most $MAX_RESTARTS times)."
      echo "# Anything else: stop with that status."
      return 0
    fi
    reattached=0
    while (( status == 255 && reattached < 3 )) && [[ "$(slice_state)" == READY ]]; do  # ssh lost, run goes on
      reattached=$((reattached + 1)); sleep "$POLL_S"; status=0; watch || status=$?
    done
    (( status != 0 )) || { echo "tpu_pod: finished"; return 0; }
    state=$(slice_state)
    if (( status != 75 && status != VANISHED )) && [[ "$PREEMPTED_STATES" != *" $state "* ]]; then
      echo "tpu_pod: cab_jax.main failed with status $status (slice $state); not restarting" >&2
      return "$status"
    fi
    [[ "$state" != NOT_FOUND ]] || { echo "tpu_pod: $NAME no longer exists; not restarting" >&2; return 75; }
    (( restarts < MAX_RESTARTS )) || { echo "tpu_pod: $MAX_RESTARTS restarts done; giving up" >&2; return 75; }
    restarts=$((restarts + 1))
    if [[ "$PREEMPTED_STATES" == *" $state "* ]]; then create; setup; fi
    echo "tpu_pod: restart $restarts/$MAX_RESTARTS (status $status, slice $state): resuming from the last checkpoint"
  done
}

help_exit "$@"
while (( $# )); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --data_disk=*) DATA_DISK="${1#*=}" ;;
    --valid_until=*) VALID_UNTIL="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --python_version=*) PYTHON_VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --reserved) RESERVED=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (flags of cab_jax.main go after --; see --help)" ;;
    *) [[ -z "$COMMAND" ]] || die "unexpected argument $1"; COMMAND="$1" ;;
  esac
  shift
done
[[ -n "$COMMAND" ]] || { usage >&2; exit 2; }
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name=NAME and --zone=ZONE are required"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts=$MAX_RESTARTS: expected a count"

case "$COMMAND" in
  up) create; setup; run_main ;;
  create) create ;;
  setup) setup ;;
  run) run_main ;;
  logs) watch ;;
  stop) gcloud_tpus tpu-vm ssh "$NAME" --worker=all --command="cd ~/cab_jax && launch/tpu_worker.sh stop" ;;
  delete)
    if dry || [[ "$(slice_state)" == READY ]]; then  # save a checkpoint first
      gcloud_tpus tpu-vm ssh "$NAME" --worker=all --command="cd ~/cab_jax && launch/tpu_worker.sh stop" || true
    fi
    delete_slice ;;
  *) die "unknown command $COMMAND (up, create, setup, run, logs, stop, delete)" ;;
esac
