#!/usr/bin/env bash
# Builds ONLY the float32 path of mamba-ssm's selective-scan CUDA extension (selective_scan_cuda: fwd for
# float inputs with float or complex weights, bwd for float/real), and with DTYPES=fp32,bf16 also bfloat16
# inputs with float weights, for one GPU arch, without setuptools or ninja, and checks that it imports. mamba's sources are NOT in this repository: MAMBA_CSRC (required) names a
# directory holding mamba's csrc/selective_scan files, unchanged (this was written against commit e9594ce):
#
#   git clone https://github.com/state-spaces/mamba
#   MAMBA_CSRC=mamba/csrc/selective_scan bash benchmarks/mamba_cuda/build.sh   # from the repository root
#   python3 benchmarks/mamba_cuda/bench.py
#
# The machine that runs it needs nvcc (CUDA_HOME), g++, python3 headers and a CUDA build of torch. It compiles
# mamba's selective_scan.cpp, selective_scan_fwd_fp32.cu and selective_scan_bwd_fp32_real.cu (and the bf16 pair),
# plus stubs.cpp
# (ours: the left-out half/bfloat16/complex-bwd instantiations as functions that raise, so that the .so has no
# undefined symbols of its own), in parallel: ~2 min (the bwd file alone takes that long).
# Flags are those of mamba's setup.py (after torch's CUDAExtension defaults), for sm_${ARCH} only.
# Environment knobs:
#   MAMBA_CSRC (required), ARCH=90, JOBS=$(nproc), PYTHON=python3, CUDA_HOME=/usr/local/cuda, CXX=g++,
#   CXX_STD=c++17 (mamba's), BUILD_DIR=benchmarks/mamba_cuda/build, PTXAS_VERBOSE=0 (1 adds mamba's
#   --ptxas-options=-v: register counts), EXTRA_INCLUDES='' (space-separated dirs), SKIP_IMPORT=0,
#   DTYPES=fp32 (or fp32,bf16).
# A compile-only check with a CPU-only torch and a local nvcc also works: SKIP_IMPORT=1 and EXTRA_INCLUDES=
# a directory holding an empty c10/cuda/impl/cuda_cmake_macros.h (a header CPU wheels lack).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${BUILD_DIR:-$HERE/build}
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=$CUDA_HOME/bin/nvcc
ARCH=${ARCH:-90}
JOBS=${JOBS:-$(nproc)}
CXX_STD=${CXX_STD:-c++17}
CXX=${CXX:-g++}

die() { echo "build.sh: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }  # seconds since $1
T0=$(now)

# --- mamba's sources -------------------------------------------------------------------------------------
NEEDED=(selective_scan.cpp selective_scan.h selective_scan_common.h static_switch.h reverse_scan.cuh
        uninitialized_copy.cuh selective_scan_fwd_kernel.cuh selective_scan_bwd_kernel.cuh
        selective_scan_fwd_fp32.cu selective_scan_bwd_fp32_real.cu)
DTYPES=${DTYPES:-fp32}
case $DTYPES in
    fp32) BF16=0 ;;
    fp32,bf16 | bf16,fp32) BF16=1; NEEDED+=(selective_scan_fwd_bf16.cu selective_scan_bwd_bf16_real.cu) ;;
    *) die "DTYPES=$DTYPES: expected fp32 or fp32,bf16" ;;
esac
HOWTO="get them with: git clone https://github.com/state-spaces/mamba && MAMBA_CSRC=mamba/csrc/selective_scan bash benchmarks/mamba_cuda/build.sh"
[[ -n ${MAMBA_CSRC:-} ]] || die "MAMBA_CSRC is not set: it must name a directory with mamba's csrc/selective_scan \
files (${NEEDED[*]}); $HOWTO"
[[ -d $MAMBA_CSRC ]] || die "MAMBA_CSRC=$MAMBA_CSRC is not a directory; $HOWTO"
SRC=$(cd "$MAMBA_CSRC" && pwd)
missing=()
for f in "${NEEDED[@]}"; do [[ -f $SRC/$f ]] || missing+=("$f"); done
(( ${#missing[@]} == 0 )) || die "MAMBA_CSRC=$SRC lacks ${missing[*]} (needs all of: ${NEEDED[*]}); $HOWTO"

[[ -x $NVCC ]] || die "nvcc not found at $NVCC (set CUDA_HOME)"
command -v "$CXX" >/dev/null || die "$CXX not found"

# --- torch / python paths and flags --------------------------------------------------------------------
TORCH_ENV=$("$PY" - <<'PYEOF'
import os
import shlex
import sys
import sysconfig
import warnings

warnings.simplefilter("ignore")
import torch
import torch.utils.cpp_extension as ce


def paths(fn):
    try:  # newer torch: device_type="cuda"; older: cuda=True
        return fn(device_type="cuda")
    except TypeError:
        return fn(cuda=True)
    except OSError:  # CPU-only torch (a local syntax check): torch's own dirs + $CUDA_HOME
        cuda = os.environ["CUDA_HOME"]
        sub = "include" if fn is ce.include_paths else ("lib64" if os.path.isdir(cuda + "/lib64") else "lib")
        print(f"build.sh: torch has no CUDA ({torch.__version__}); using {cuda}/{sub}", file=sys.stderr)
        return fn() + [os.path.join(cuda, sub)]


def q(xs):
    return "(" + " ".join(shlex.quote(x) for x in xs) + ")"


print(f"TORCH_VERSION={shlex.quote(torch.__version__)}")
print(f"TORCH_CUDA={shlex.quote(str(torch.version.cuda))}")
print(f"TORCH_INCLUDES={q(paths(ce.include_paths))}")
print(f"TORCH_LIBDIRS={q(paths(ce.library_paths))}")
print(f"TORCH_LIBDIR={shlex.quote(ce.TORCH_LIB_PATH)}")
print(f"PY_INCLUDE={shlex.quote(sysconfig.get_paths()['include'])}")
print(f"EXT_SUFFIX={shlex.quote(sysconfig.get_config_var('EXT_SUFFIX') or '.so')}")
print(f"CXX11_ABI={int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))}")
print(f"PYBIND_FLAGS={q(getattr(ce, '_get_pybind11_abi_build_flags', lambda: [])())}")
print(f"TORCH_NVCC_FLAGS={q(getattr(ce, 'COMMON_NVCC_FLAGS', []))}")
PYEOF
) || die "could not query torch with $PY"
eval "$TORCH_ENV"
[[ -f $PY_INCLUDE/Python.h ]] || die "Python.h not found in $PY_INCLUDE (python3-dev headers missing)"

echo "== build of selective_scan_cuda ($DTYPES), sm_$ARCH, JOBS=$JOBS, sources $SRC"
echo "   torch $TORCH_VERSION (CUDA $TORCH_CUDA), cxx11 abi $CXX11_ABI, python include $PY_INCLUDE"
echo "   $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "   $("$CXX" --version | head -n 1)"

mkdir -p "$OUT/obj" "$OUT/log"
rm -f "$OUT"/obj/*.o "$OUT"/log/* "$OUT"/selective_scan_cuda*.so

INCLUDES=(-I"$SRC")
for d in ${EXTRA_INCLUDES:-}; do INCLUDES+=(-I"$d"); done  # e.g. a shim for a local CPU-torch check
for d in "${TORCH_INCLUDES[@]}"; do INCLUDES+=(-isystem "$d"); done
INCLUDES+=(-isystem "$PY_INCLUDE")
DEFINES=(-DTORCH_EXTENSION_NAME=selective_scan_cuda -DTORCH_API_INCLUDE_EXTENSION_H
         "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI" "${PYBIND_FLAGS[@]}")

# g++ for the .cpp: torch's defaults (-fPIC) + mamba's "cxx": ["-O3", "-std=c++17"]
CXXFLAGS=(-fPIC -O3 "-std=$CXX_STD" "${INCLUDES[@]}" "${DEFINES[@]}")
# nvcc: torch's COMMON_NVCC_FLAGS + -fPIC, then mamba's "nvcc" list (its -U flags undo torch's -D ones),
# with mamba's cc_flag reduced to this one arch.
NVCCFLAGS=("${TORCH_NVCC_FLAGS[@]}" --compiler-options -fPIC
           -O3 "-std=$CXX_STD"
           -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
           -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__
           -U__CUDA_NO_BFLOAT162_OPERATORS__ -U__CUDA_NO_BFLOAT162_CONVERSIONS__
           --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -lineinfo
           -gencode "arch=compute_$ARCH,code=sm_$ARCH" --threads 4
           "${INCLUDES[@]}" "${DEFINES[@]}")
[[ ${PTXAS_VERBOSE:-0} == 1 ]] && NVCCFLAGS+=(--ptxas-options=-v)

# --- parallel compile ------------------------------------------------------------------------------------
NAMES=()
running=0
job() {  # job NAME command...: run in the background, log to $OUT/log/NAME.log, rc and seconds beside it
    local name=$1; shift
    NAMES+=("$name")
    while (( running >= JOBS )); do wait -n; running=$((running - 1)); done
    (
        s=$(now)
        "$@" >"$OUT/log/$name.log" 2>&1
        rc=$?
        echo $rc >"$OUT/log/$name.rc"
        since "$s" >"$OUT/log/$name.sec"
        printf '   %-28s rc=%s  %6s s\n' "$name" "$rc" "$(cat "$OUT/log/$name.sec")"
    ) &
    running=$((running + 1))
}
obj() { echo "$OUT/obj/$1.o"; }

# slowest first
job bwd_fp32_real "$NVCC" "${NVCCFLAGS[@]}" -c "$SRC/selective_scan_bwd_fp32_real.cu" -o "$(obj bwd_fp32_real)"
job fwd_fp32 "$NVCC" "${NVCCFLAGS[@]}" -c "$SRC/selective_scan_fwd_fp32.cu" -o "$(obj fwd_fp32)"
job selective_scan_cpp "$CXX" "${CXXFLAGS[@]}" -c "$SRC/selective_scan.cpp" -o "$(obj selective_scan_cpp)"
if (( BF16 )); then
    job bwd_bf16_real "$NVCC" "${NVCCFLAGS[@]}" -c "$SRC/selective_scan_bwd_bf16_real.cu" -o "$(obj bwd_bf16_real)"
    job fwd_bf16 "$NVCC" "${NVCCFLAGS[@]}" -c "$SRC/selective_scan_fwd_bf16.cu" -o "$(obj fwd_bf16)"
    job stubs "$CXX" "${CXXFLAGS[@]}" -DWITH_BF16 -I"$CUDA_HOME/include" -c "$HERE/stubs.cpp" -o "$(obj stubs)"
else
    job stubs "$CXX" "${CXXFLAGS[@]}" -I"$CUDA_HOME/include" -c "$HERE/stubs.cpp" -o "$(obj stubs)"
fi
echo "   launched ${#NAMES[@]} compile jobs ($(printf '%s ' "${NAMES[@]}"))"
wait

failed=0
for n in "${NAMES[@]}"; do
    rc=$(cat "$OUT/log/$n.rc" 2>/dev/null || echo missing)
    if [[ $rc != 0 ]]; then
        failed=1
        echo "---- $n FAILED (rc=$rc); compiler output (errors first, then the last 60 lines):" >&2
        grep -n -m 40 -E 'error|Error' "$OUT/log/$n.log" >&2
        tail -n 60 "$OUT/log/$n.log" >&2
    fi
done
echo "== compile wall time $(since "$T0") s"
(( failed )) && die "compile failed (logs in $OUT/log)"

# --- link ------------------------------------------------------------------------------------------------
LIBS=()
for l in c10 c10_cuda torch torch_cpu torch_cuda torch_python; do
    if compgen -G "$TORCH_LIBDIR/lib$l.so*" >/dev/null; then LIBS+=("-l$l")
    else echo "   WARNING: lib$l.so not in $TORCH_LIBDIR (CPU-only torch?); linking without it" >&2; fi
done
CUDA_LIBDIR=$CUDA_HOME/lib64; [[ -d $CUDA_LIBDIR ]] || CUDA_LIBDIR=$CUDA_HOME/lib
SO=$OUT/selective_scan_cuda$EXT_SUFFIX
LINK=("$CXX" -shared -o "$SO" "$OUT"/obj/*.o)
for d in "${TORCH_LIBDIRS[@]}"; do LINK+=(-L"$d"); done
LINK+=(-L"$CUDA_LIBDIR" "${LIBS[@]}" -lcudart "-Wl,-rpath,$TORCH_LIBDIR" "-Wl,-rpath,$CUDA_LIBDIR")
s=$(now)
"${LINK[@]}" >"$OUT/log/link.log" 2>&1 || { cat "$OUT/log/link.log" >&2; die "link failed"; }
printf '   %-28s %6s s\n' link "$(since "$s")"

# Symbols of the extension that nothing defines (libpython's and torch's are resolved at import).
undef=$(nm -D --undefined-only "$SO" | c++filt | grep -E 'selective_scan_(fwd|bwd)_(cuda|launch)' || true)
if [[ -n $undef ]]; then echo "   WARNING: undefined selective-scan symbols (bench.py imports with RTLD_LAZY):"; echo "$undef"; fi

# --- import check ----------------------------------------------------------------------------------------
if [[ ${SKIP_IMPORT:-0} != 1 ]]; then
    "$PY" - "$OUT" <<'PYEOF' || die "built, but the import failed"
import os
import sys

import torch  # noqa: F401  first: loads libtorch / libc10 that the extension links against

sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
sys.path.insert(0, sys.argv[1])
import selective_scan_cuda

names = [n for n in dir(selective_scan_cuda) if not n.startswith("_")]
print("   import ok:", selective_scan_cuda.__file__, "functions:", names)
PYEOF
fi
echo "== built $SO in $(since "$T0") s"
