// The head dims and half types the CUDA attention kernels are compiled for, and the one switch from runtime
// values to those template arguments (shared by decode_dispatch.cu and prefill_dispatch.cu; the kernels are
// instantiated one head dim per file, *_hd{64,128,256}.cu, with SOFTPROMPT_INSTANTIATE_HALF_TYPES).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/cuda_compat.h"
#include "cuda/head_dims.h"

namespace softprompt {
namespace cuda {

// Calls run(T{}, std::integral_constant<int, D>{}) for the half type and head dim given; cudaErrorInvalidValue
// for a head dim without kernels (cuda_forward.h rejects those first). Keep in step with supports_head_dim.
template <typename Run>
cudaError_t dispatch_half_and_head_dim(HalfType dtype, int64_t head_dim, Run&& run) {
  auto with_type = [&](auto type) -> cudaError_t {
    switch (head_dim) {
      case 64: return run(type, std::integral_constant<int, 64>{});
      case 128: return run(type, std::integral_constant<int, 128>{});
      case 256: return run(type, std::integral_constant<int, 256>{});
      default: return cudaErrorInvalidValue;
    }
  };
  return dtype == HalfType::kBFloat16 ? with_type(__nv_bfloat16{}) : with_type(__half{});
}

}  // namespace cuda
}  // namespace softprompt

// Explicit instantiations of kernel entry `fn<T, D>(const Params&, cudaStream_t)` for both half types.
#define SOFTPROMPT_INSTANTIATE_HALF_TYPES(fn, Params, D)                               \
  namespace softprompt {                                                                 \
  namespace cuda {                                                                       \
  template cudaError_t fn<__nv_bfloat16, D>(const Params&, cudaStream_t);               \
  template cudaError_t fn<__half, D>(const Params&, cudaStream_t);                      \
  }                                                                                      \
  }
