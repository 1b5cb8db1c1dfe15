// Entry points of the CUDA decode kernels, for the binding (no CUDA headers: the binding is
// compiled by the host compiler).
#pragma once

#include "cuda/decode_params.h"

typedef struct CUstream_st* cudaStream_t;

namespace softprompt {
namespace cuda {

// Head dims with a compiled decode kernel.
inline bool decode_supports_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }

// Runs the split kernel (and the combine pass when num_splits > 1); returns a cudaError_t value.
int launch_prefix_decode(const DecodeParams& params, HalfType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace softprompt
