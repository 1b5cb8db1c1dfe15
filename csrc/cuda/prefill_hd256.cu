// Instantiations of the prefill kernel for head dim 256 (one file per head dim keeps builds parallel).
#include "cuda/prefill_kernel.cuh"

namespace softprompt {
namespace cuda {
template cudaError_t run_prefix_prefill<__nv_bfloat16, 256>(const PrefixAttentionParams&, cudaStream_t);
template cudaError_t run_prefix_prefill<__half, 256>(const PrefixAttentionParams&, cudaStream_t);
}  // namespace cuda
}  // namespace softprompt
