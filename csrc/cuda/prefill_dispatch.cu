// Dtype / head-dim dispatch of the prefill kernel (instantiated in prefill_hd*.cu).
#include "cuda/cuda_compat.h"
#include "cuda/prefill_launch.h"

namespace softprompt {
namespace cuda {

template <typename T, int D>
cudaError_t run_prefix_prefill(const PrefixAttentionParams& params, cudaStream_t stream);

template <typename T>
static cudaError_t dispatch_head_dim(const PrefixAttentionParams& params, cudaStream_t stream) {
  switch (params.head_dim) {
    case 64: return run_prefix_prefill<T, 64>(params, stream);
    case 128: return run_prefix_prefill<T, 128>(params, stream);
    case 256: return run_prefix_prefill<T, 256>(params, stream);
    default: return cudaErrorInvalidValue;  // the binding rejects other head dims first
  }
}

int launch_prefix_prefill(const PrefixAttentionParams& params, HalfType dtype, cudaStream_t stream) {
  return int(dtype == HalfType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(params, stream)
                                          : dispatch_head_dim<__half>(params, stream));
}

}  // namespace cuda
}  // namespace softprompt
