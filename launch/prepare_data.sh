#!/usr/bin/env bash
# Prepare the data of a run once, on one machine, before a multi-process launch (so that no worker builds it
# concurrently): `python -m cab_jax.data.prepare` with the run's config, and exactly what that run will read.
#
#   # ImageNet for configs/vim_small.py and vim_tiny.py (every subset: they share one label cache), built from
#   # the manually downloaded tars (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) as array_record
#   launch/prepare_data.sh --data_dir=/shared/tensorflow_datasets --manual_dir=/shared/imagenet_tars
#   # the text of configs/phi_mamba.py: cab_text, or an external TFDS text dataset packed with its tokenizer
#   launch/prepare_data.sh --data_dir=/shared/tensorflow_datasets --config=configs/phi_mamba.py \
#       --config.data.name=NAME --config.data.tokenizer=/shared/hf/phi-1_5 [--download]
#
# Options: --data_dir=DIR (the run's config.data.data_dir; required), --config=FILE[:variant] (default
# configs/vim_small.py), --dry_run (or DRY_RUN=1: print the python command and exit 0); anything else
# (--manual_dir, --download, --config.FIELD=VALUE overrides) goes to cab_jax.data.prepare.
#
# Assumes: PYTHON (default: python) has the project installed; building imagenet2012 also needs TensorFlow for
# TFDS's builder (pip install tensorflow-cpu; training does not), ~160 GB free in DATA_DIR and a few hours. A
# gs:// DATA_DIR works for TFDS when gcsfs is installed; run it on one worker (or any machine) and point every run
# at the same DATA_DIR. Exit status: that of the python command (0 done, 2 a usage error, one line on stderr).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
DATA_DIR="" CONFIG="configs/vim_small.py"
PASS=()

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, die, dry, quote, run, help_exit, wait_for

for arg in "$@"; do
  case "$arg" in
    --data_dir=*) DATA_DIR="${arg#*=}" ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) PASS+=("$arg") ;;
  esac
done
[[ -n "$DATA_DIR" ]] || die "--data_dir=DIR is required: the TFDS data directory every run will read"
[[ "$DATA_DIR" == *://* || "$DATA_DIR" == /* ]] || DATA_DIR="$PWD/$DATA_DIR"  # the command runs in the project
[[ "$CONFIG" == /* || "$PWD" == "$REPO" || ! -f "${CONFIG%%:*}" ]] || CONFIG="$PWD/$CONFIG"

cmd=("$PYTHON" -m cab_jax.data.prepare --config="$CONFIG" --config.data.data_dir="$DATA_DIR" "${PASS[@]}")
if dry; then
  echo "+ cd $(quote "$REPO")"
  echo "+ $(quote "${cmd[@]}")"
  exit 0
fi
cd "$REPO"
exec "${cmd[@]}"
