// Instantiations of the decode kernels for head dim 64 (one file per head dim keeps builds parallel).
#include "cuda/decode_kernel.cuh"

namespace softprompt {
namespace cuda {
template cudaError_t run_prefix_decode<__nv_bfloat16, 64>(const DecodeParams&, cudaStream_t);
template cudaError_t run_prefix_decode<__half, 64>(const DecodeParams&, cudaStream_t);
}  // namespace cuda
}  // namespace softprompt
