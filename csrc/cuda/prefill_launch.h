// Entry point of the CUDA prefill kernel, for the binding (no CUDA headers).
#pragma once

#include "cuda/head_dims.h"
#include "cuda/prefill_params.h"
#include "prefix_attention/params.h"

typedef struct CUstream_st* cudaStream_t;

namespace softprompt {
namespace cuda {

// Runs the prefill forward; returns a cudaError_t value.
int launch_prefix_prefill(const PrefixAttentionParams& params, HalfType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace softprompt
