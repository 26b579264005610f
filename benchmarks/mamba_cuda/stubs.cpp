// Definitions of the selective-scan instantiations this build leaves out (half inputs, bfloat16 ones unless
// WITH_BF16, and the complex-weight backward), so that the extension has no undefined symbols of its own and
// imports under any dlopen flags; each raises a Python RuntimeError if called. The float/float and
// float/complex forward and the float/float backward come from mamba's own .cu files (see build.sh).
// Only the two template declarations below repeat mamba's (they name the functions its selective_scan.cpp
// calls); the parameter structs come from its selective_scan.h, found through $MAMBA_CSRC.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <cuda_runtime_api.h>

#include "selective_scan.h"

template <typename input_t, typename weight_t>
void selective_scan_fwd_cuda(SSMParamsBase &params, cudaStream_t stream);
template <typename input_t, typename weight_t>
void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);

#define STUB(FN, PARAMS, I, W)                                                                                \
    template <> void FN<I, W>(PARAMS &, cudaStream_t) {                                                       \
        TORCH_CHECK(false, #FN "<" #I ", " #W "> is not in this float32-only build (benchmarks/mamba_cuda)"); \
    }

using cfloat = c10::complex<float>;
STUB(selective_scan_fwd_cuda, SSMParamsBase, c10::Half, float)
STUB(selective_scan_fwd_cuda, SSMParamsBase, c10::Half, cfloat)
#ifndef WITH_BF16  // build.sh's DTYPES=fp32,bf16 compiles mamba's own bfloat16 / float instantiations
STUB(selective_scan_fwd_cuda, SSMParamsBase, c10::BFloat16, float)
#endif
STUB(selective_scan_fwd_cuda, SSMParamsBase, c10::BFloat16, cfloat)
STUB(selective_scan_bwd_cuda, SSMParamsBwd, float, cfloat)
STUB(selective_scan_bwd_cuda, SSMParamsBwd, c10::Half, float)
STUB(selective_scan_bwd_cuda, SSMParamsBwd, c10::Half, cfloat)
#ifndef WITH_BF16
STUB(selective_scan_bwd_cuda, SSMParamsBwd, c10::BFloat16, float)
#endif
STUB(selective_scan_bwd_cuda, SSMParamsBwd, c10::BFloat16, cfloat)
