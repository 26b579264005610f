#!/usr/bin/env bash
# The original CAB train step (PyTorch) and ours (JAX) on the same GPU in one run, so that their ratio is measured,
# not quoted. From the repository root, with a CAB checkout and an upstream mamba checkout (their sources are not
# in this repository):
#
#   git clone https://github.com/wph6/CAB && git clone https://github.com/state-spaces/mamba
#   CAB_ROOT=CAB/vision_CAB MAMBA_CSRC=mamba/csrc/selective_scan bash benchmarks/cab_torch/compare.sh
#
# 1. builds the anchor's CUDA extensions into BUILD_DIR unless they are there (mamba_cuda/build.sh for the scan,
#    cab_torch/step.py for causal-conv1d; about 3 minutes on 16 cores);
# 2. times CAB's step (float32, TF32 matmuls, as CAB trains) at each of BATCHES;
# 3. times our Vim-S step (benchmarks/train_throughput.py: float32 and bfloat16, remat) at the same batches.
# Each script prints one JSON row per measurement as it goes, so a run cut short keeps what it measured.
# Knobs: BUILD_DIR=/tmp/cab_build, BATCHES=128,64, STEPS=20, DTYPES=float32,bfloat16, PYTHON=python3.
set -euo pipefail

: "${CAB_ROOT:?CAB_ROOT must name the vision_CAB directory of a CAB checkout}"
BUILD_DIR=${BUILD_DIR:-/tmp/cab_build}
BATCHES=${BATCHES:-128,64}
STEPS=${STEPS:-20}
DTYPES=${DTYPES:-float32,bfloat16}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ! compgen -G "$BUILD_DIR/selective_scan_cuda*.so" >/dev/null; then
    : "${MAMBA_CSRC:?MAMBA_CSRC must name csrc/selective_scan of an upstream mamba checkout (BUILD_DIR has no scan extension)}"
    MAMBA_CSRC=$MAMBA_CSRC BUILD_DIR=$BUILD_DIR bash "$HERE/../mamba_cuda/build.sh" >&2
fi
"$PY" "$HERE/step.py" --cab_root="$CAB_ROOT" --build_dir="$BUILD_DIR" --batch_sizes="$BATCHES" --steps="$STEPS"
for batch in ${BATCHES//,/ }; do
    "$PY" "$HERE/../train_throughput.py" --configs=vim_small --dtypes="$DTYPES" --remat=true --batch_size="$batch" \
        --steps="$STEPS" | grep --line-buffered '^{'
done
