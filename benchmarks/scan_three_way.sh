#!/usr/bin/env bash
# The selective-scan kernels side by side in one run: mamba-ssm's CUDA kernel (built from an upstream checkout),
# our Mosaic GPU and Triton Pallas kernels, at the Vim-Ti/S/B shapes and length 4096, float32 and bfloat16.
# From the repository root, on a GPU machine, with mamba's sources in a checkout (not in this repository):
#
#   git clone https://github.com/state-spaces/mamba
#   MAMBA_CSRC=mamba/csrc/selective_scan bash benchmarks/scan_three_way.sh > rows.jsonl
#
# A Mosaic GPU forward+backward takes one to two minutes to compile, so every (shape, dtype) runs in its own
# process and they all compile at once, beside the mamba build (mamba_cuda/build.sh, DTYPES=fp32,bf16, unless
# BUILD_DIR already holds it); the timings take turns on the GPU (selective_scan.py --lock, and flock for mamba's),
# so no two share it. Every row is one JSON line on stdout, as it comes; logs go to stderr.
# Our impls of one (shape, dtype) are timed in ROUNDS interleaved rounds (selective_scan.py --rounds): the rows give
# the medians and each impl's median ratio to the first in the same round.
# Knobs: SHAPES=vim_ti,vim_s,vim_b,long, DTYPES=float32,bfloat16, IMPLS=pallas_mosaic,pallas_triton, ITERS=20,
# ROUNDS=5, BUILD_DIR=benchmarks/mamba_cuda/build, JOBS=8 (build), PYTHON=python3.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SHAPES=${SHAPES:-vim_ti,vim_s,vim_b,long}
DTYPES=${DTYPES:-float32,bfloat16}
IMPLS=${IMPLS:-pallas_mosaic,pallas_triton}
ITERS=${ITERS:-20}
ROUNDS=${ROUNDS:-5}
BUILD_DIR=${BUILD_DIR:-$HERE/mamba_cuda/build}
PY=${PYTHON:-python3}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several JAX processes share the GPU
WORK=$(mktemp -d)
LOCK=$WORK/gpu.lock
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT

build_pid=
if ! compgen -G "$BUILD_DIR/selective_scan_cuda*.so" >/dev/null; then
    : "${MAMBA_CSRC:?MAMBA_CSRC must name csrc/selective_scan of an upstream mamba checkout (BUILD_DIR has no build)}"
    MAMBA_CSRC=$MAMBA_CSRC BUILD_DIR=$BUILD_DIR DTYPES=fp32,bf16 JOBS=${JOBS:-8} \
        bash "$HERE/mamba_cuda/build.sh" >&2 &
    build_pid=$!
fi
pids=()
for shape in ${SHAPES//,/ }; do
    for dtype in ${DTYPES//,/ }; do
        "$PY" "$HERE/selective_scan.py" --shapes="$shape" --dtypes="$dtype" --impls="$IMPLS" --iters="$ITERS" \
            --rounds="$ROUNDS" --check --lock="$LOCK" 2> "$WORK/$shape.$dtype.log" | grep --line-buffered '^{' &
        pids+=($!)
    done
done
status=0
if [[ -n $build_pid ]] && ! wait "$build_pid"; then
    echo "scan_three_way.sh: the mamba build failed; no mamba rows" >&2
    status=1
else
    flock "$LOCK" "$PY" "$HERE/mamba_cuda/bench.py" --shapes="$SHAPES" --dtypes="$DTYPES" --iters="$ITERS" \
        --build_dir="$BUILD_DIR" --json || status=1
fi
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for log in "$WORK"/*.log; do
    grep -q -i 'error\|traceback' "$log" && { echo "== $log" >&2; tail -20 "$log" >&2; }
done
exit $status
