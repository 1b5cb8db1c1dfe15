// Instantiations of the prefill kernel for head dim 64 (one file per head dim keeps builds parallel).
#include "cuda/prefill_kernel.cuh"

namespace softprompt {
namespace cuda {
template cudaError_t run_prefix_prefill<__nv_bfloat16, 64>(const PrefixAttentionParams&, cudaStream_t);
template cudaError_t run_prefix_prefill<__half, 64>(const PrefixAttentionParams&, cudaStream_t);
}  // namespace cuda
}  // namespace softprompt
