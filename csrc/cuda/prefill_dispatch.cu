// Half-type / head-dim dispatch of the prefill kernels (instantiated in prefill_hd*.cu).
#include "cuda/prefill_launch.h"
#include "cuda/head_dim_dispatch.h"

namespace softprompt {
namespace cuda {

template <typename T, int D>
cudaError_t run_prefix_prefill(const PrefixAttentionParams& params, cudaStream_t stream);

int launch_prefix_prefill(const PrefixAttentionParams& params, HalfType dtype, cudaStream_t stream) {
  return int(dispatch_half_and_head_dim(dtype, params.head_dim, [&](auto type, auto head_dim) {
    return run_prefix_prefill<decltype(type), decltype(head_dim)::value>(params, stream);
  }));
}

}  // namespace cuda
}  // namespace softprompt
