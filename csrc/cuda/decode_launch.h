// Entry points of the CUDA decode kernels, for the binding (no CUDA headers: the binding is
// compiled by the host compiler).
#pragma once

#include "cuda/decode_params.h"
#include "cuda/head_dims.h"

typedef struct CUstream_st* cudaStream_t;

namespace softprompt {
namespace cuda {

// Runs the split kernel (and the combine pass when num_splits > 1); returns a cudaError_t value.
int launch_prefix_decode(const DecodeParams& params, HalfType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace softprompt
