// Instantiations of the prefill kernel for head dim 128 (one file per head dim keeps builds parallel).
#include "cuda/prefill_kernel.cuh"

namespace softprompt {
namespace cuda {
template cudaError_t run_prefix_prefill<__nv_bfloat16, 128>(const PrefixAttentionParams&, cudaStream_t);
template cudaError_t run_prefix_prefill<__half, 128>(const PrefixAttentionParams&, cudaStream_t);
}  // namespace cuda
}  // namespace softprompt
