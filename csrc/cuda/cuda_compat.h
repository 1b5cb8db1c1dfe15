// What every CUDA kernel header includes instead of the CUDA headers directly.
//
// Built by nvcc: the CUDA runtime, bf16/fp16 types and WMMA. Built by a host C++
// compiler with SOFTPROMPT_SIMT_EMULATION defined (tests only): a small SIMT
// emulator (tests/cuda_emulation/simt_emulation.h) that runs each block's threads
// as host threads, so the kernels' indexing, masking and reductions are tested on
// machines without a GPU. Kernels written against this header use only: the
// built-in indices, __syncthreads/__syncwarp, full-warp __shfl_xor_sync, static and
// dynamic (SOFTPROMPT_DYNAMIC_SMEM) shared memory, WMMA tile ops through smem, and
// the conversion helpers below.
#pragma once

#ifdef SOFTPROMPT_SIMT_EMULATION
#include "simt_emulation.h"  // found through the test build's include path
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define SOFTPROMPT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]  // WMMA tiles need 32-byte alignment
#define SOFTPROMPT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace softprompt {
namespace cuda {

constexpr int kWarpSize = 32;

template <typename T> struct Convert;
template <> struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};
template <> struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
};
template <> struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <typename T> __device__ __forceinline__ float to_float(T x) { return Convert<T>::to_float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return Convert<T>::from_float(x); }

// Unpacks 8 half-precision values held in one 16-byte vector.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& packed, float (&dst)[8]) {
  const T* elems = reinterpret_cast<const T*>(&packed);
#pragma unroll
  for (int i = 0; i < 8; ++i) dst[i] = to_float(elems[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace cuda
}  // namespace softprompt
