// CUDA kernels of the fused prompt insertion, with their launch configuration.
//
// Plain CUDA C++ (no torch). Everything goes through cuda/cuda_compat.h (launches
// too, through SOFTPROMPT_LAUNCH), so the same code also runs under the SIMT
// emulator in tests (tests/test_prompt_insertion_simt.py).
//
// Forward: one block per output row (b, t) of out [B, k + n, d], grid-stride when
// the rows outnumber the grid; the block's threads copy the row with 16-byte
// vectors when every row start is 16-byte aligned, element by element otherwise.
// Backward: each thread owns one column c of the flattened grad_prompt [k, d] and
// one slice of the batch; a block's slices are then added in a fixed order.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/cuda_compat.h"
#include "prompt_insertion/params.h"

namespace softprompt {
namespace cuda {
namespace insertion {

constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this (gridDim.x allows 2^31 - 1)
constexpr int kMaxCopyThreads = 256;
constexpr int kGradColumns = 32;  // grad_prompt columns per backward block: one warp, coalesced
constexpr int kGradSlices = 8;    // batch slices per backward block (blockDim.y)

// A quiet NaN of T, built from its bits (no math-library call, safe under fast math).
template <typename T>
__device__ __forceinline__ T quiet_nan() {
  const uint32_t bits = 0x7fc00000u;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return from_float<T>(f);
}

// A copy unit (T, or a 16-byte uint4 of 16 / sizeof(T) elements) filled with NaN.
template <typename T, typename Unit>
__device__ __forceinline__ Unit nan_unit() {
  constexpr int kPerUnit = sizeof(Unit) / sizeof(T);
  T elems[kPerUnit];
#pragma unroll
  for (int i = 0; i < kPerUnit; ++i) elems[i] = quiet_nan<T>();
  Unit u;
  memcpy(&u, elems, sizeof(u));
  return u;
}

// out [B, k + n, d] <- prompt [k, d] rows, then weight [V, d] rows of input_ids [B, n].
// Unit is the copy granule: T, or uint4 when d * sizeof(T), the row strides and the
// base pointers are all multiples of 16 bytes (the launcher checks).
template <typename T, typename Unit>
__global__ void __launch_bounds__(kMaxCopyThreads) insert_prompt_fwd_kernel(const InsertPromptParams p) {
  constexpr int64_t kPerUnit = sizeof(Unit) / sizeof(T);
  const int64_t k = p.prompt_len, L = p.prompt_len + p.num_ids, rows = p.batch * L;
  const int64_t units = p.dim / kPerUnit;  // per row
  const Unit* weight = static_cast<const Unit*>(p.weight);
  const Unit* prompt = static_cast<const Unit*>(p.prompt);
  Unit* out = static_cast<Unit*>(p.out);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = r / L, t = r % L;
    const Unit* src = nullptr;  // stays null for an out-of-range id
    if (t < k) {
      src = prompt + t * (p.prompt_stride_k / kPerUnit);
    } else {
      const int64_t id = p.input_ids[b * p.ids_stride_b + (t - k) * p.ids_stride_t];
      if (id >= 0 && id < p.vocab) src = weight + id * (p.weight_stride_v / kPerUnit);
    }
    Unit* dst = out + r * units;
    if (src != nullptr) {
      for (int64_t j = threadIdx.x; j < units; j += blockDim.x) dst[j] = src[j];
    } else {  // loud, never a silent wrong row or an out-of-bounds read
      const Unit nan = nan_unit<T, Unit>();
      for (int64_t j = threadIdx.x; j < units; j += blockDim.x) dst[j] = nan;
    }
  }
}

// grad_prompt [k, d] (float) <- sum over b of grad_out [B, >= k, d] (any strides).
// blockDim = (kGradColumns, kGradSlices): thread (x, y) sums rows b = y, y + kGradSlices, ...
// of column c = tile * kGradColumns + x; row y == 0 then adds the kGradSlices partials in
// order y = 0, 1, ...: a fixed summation order, so the result is deterministic.
template <typename T>
__global__ void __launch_bounds__(kGradColumns * kGradSlices) insert_prompt_bwd_kernel(
    const InsertPromptGradParams p) {
  __shared__ float partial[kGradSlices][kGradColumns];
  const T* grad_out = static_cast<const T*>(p.grad_out);
  float* grad_prompt = static_cast<float*>(p.grad_prompt);
  const int64_t total = p.prompt_len * p.dim;
  const int64_t tiles = (total + kGradColumns - 1) / kGradColumns;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t c = tile * kGradColumns + threadIdx.x;
    float acc = 0.f;
    if (c < total) {
      const int64_t i = c / p.dim, j = c % p.dim;
      const T* src = grad_out + i * p.grad_stride_t + j * p.grad_stride_d;
#pragma unroll 4
      for (int64_t b = threadIdx.y; b < p.batch; b += kGradSlices) acc += to_float(src[b * p.grad_stride_b]);
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < total) {
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kGradSlices; ++s) sum += partial[s][threadIdx.x];
      grad_prompt[c] = sum;
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
bool can_copy_16_bytes(const InsertPromptParams& p) {
  const auto bytes = [](int64_t elems) { return elems * static_cast<int64_t>(sizeof(T)); };
  const bool rows_ok = bytes(p.dim) % 16 == 0 && aligned16(p.out);
  const bool weight_ok = p.batch * p.num_ids == 0 || (aligned16(p.weight) && bytes(p.weight_stride_v) % 16 == 0);
  const bool prompt_ok = p.prompt_len == 0 || (aligned16(p.prompt) && bytes(p.prompt_stride_k) % 16 == 0);
  return rows_ok && weight_ok && prompt_ok;
}

inline unsigned clamp_blocks(int64_t wanted, int64_t max_blocks) {
  return static_cast<unsigned>(wanted < max_blocks ? wanted : max_blocks);
}

// max_blocks caps the grid (tests lower it to exercise the grid-stride loops).
template <typename T>
void launch_fwd(const InsertPromptParams& p, cudaStream_t stream, int64_t max_blocks = kMaxBlocks) {
  const int64_t rows = p.batch * (p.prompt_len + p.num_ids);
  if (rows == 0 || p.dim == 0) return;
  const bool vec = can_copy_16_bytes<T>(p);
  const int64_t units = vec ? p.dim * static_cast<int64_t>(sizeof(T)) / 16 : p.dim;
  const int64_t warps = (units + kWarpSize - 1) / kWarpSize;
  const int threads = static_cast<int>(warps * kWarpSize < kMaxCopyThreads ? warps * kWarpSize : kMaxCopyThreads);
  const dim3 grid(clamp_blocks(rows, max_blocks)), block(threads);
  if (vec) {
    SOFTPROMPT_LAUNCH((insert_prompt_fwd_kernel<T, uint4>), grid, block, 0, stream, p);
  } else {
    SOFTPROMPT_LAUNCH((insert_prompt_fwd_kernel<T, T>), grid, block, 0, stream, p);
  }
}

template <typename T>
void launch_bwd(const InsertPromptGradParams& p, cudaStream_t stream, int64_t max_blocks = kMaxBlocks) {
  const int64_t total = p.prompt_len * p.dim;
  if (total == 0) return;
  const int64_t tiles = (total + kGradColumns - 1) / kGradColumns;
  const dim3 grid(clamp_blocks(tiles, max_blocks)), block(kGradColumns, kGradSlices);
  SOFTPROMPT_LAUNCH(insert_prompt_bwd_kernel<T>, grid, block, 0, stream, p);
}

}  // namespace insertion
}  // namespace cuda
}  // namespace softprompt
