// A small SIMT emulator for running the CUDA kernels on a CPU in tests.
//
// Each block runs as blockDim host threads (one per CUDA thread), blocks one after
// another, so `static` locals stand in for __shared__ memory. __syncthreads and
// __syncwarp are std::barrier waits, full-warp shuffles go through a per-warp
// exchange buffer, and WMMA fragments hold the whole tile (loads, mma and stores
// follow the API's tile semantics, which the hardware guarantees regardless of the
// per-lane layout; a store is written by lane 0 only, so a missing __syncwarp
// before other lanes read it is a bug here as it is on a GPU). bf16/fp16 are
// 2-byte types with round-to-nearest-even conversions.
//
// What it checks: indexing, masking, reductions, split/merge logic and barrier
// placement. What it does not: timing, memory coalescing, hardware fragment layouts
// inside registers (kernels using this header never depend on them).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define SOFTPROMPT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::simt::dynamic_smem())

typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };

inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return float(x);
}
inline __half __float2half(float f) {
  _Float16 x = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &x, 2);
  return h;
}

namespace simt {

struct BlockState {
  explicit BlockState(int threads, size_t smem_bytes)
      : block_barrier(threads), dyn_smem((smem_bytes + 15) / 16 + 1), exchange(size_t(threads)) {
    for (int w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint4> dyn_smem;
  std::vector<uint64_t> exchange;  // one slot per thread for shuffles
};

struct ThreadState {
  dim3 thread, block, block_dim, grid_dim;
  int linear = 0;
  BlockState* state = nullptr;
};
inline thread_local ThreadState current;

inline void* dynamic_smem() { return current.state->dyn_smem.data(); }
inline int lane() { return current.linear % 32; }
inline std::barrier<>& warp_barrier() { return *current.state->warp_barriers[current.linear / 32]; }

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const int threads = int(block.x * block.y * block.z);
  if (threads % 32 != 0) throw std::runtime_error("simt emulation: block size must be a multiple of 32");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState state(threads, smem_bytes);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t]() {
            current.linear = t;
            current.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            current.block = dim3(bx, by, bz);
            current.block_dim = block;
            current.grid_dim = grid;
            current.state = &state;
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
}

}  // namespace simt

#define threadIdx (::simt::current.thread)
#define blockIdx (::simt::current.block)
#define blockDim (::simt::current.block_dim)
#define gridDim (::simt::current.grid_dim)

inline void __syncthreads() { simt::current.state->block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::warp_barrier().arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto& slots = simt::current.state->exchange;
  const int me = simt::current.linear, base = me - me % 32;
  std::memcpy(&slots[me], &value, sizeof(T));
  __syncwarp();
  T other;
  std::memcpy(&other, &slots[base + ((me % 32) ^ lane_mask)], sizeof(T));
  __syncwarp();
  return other;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
using std::exp2f;
using std::fmaxf;
using std::fminf;
using std::log2f;

// WMMA with whole-tile fragments (see the header comment).
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  float tile[rows * cols];
};

inline float element_to_float(float x) { return x; }
inline float element_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float element_to_float(__half x) { return __half2float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (auto& x : f.tile) x = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Ptr>
void load_tile(fragment<Use, M, N, K, T, Layout>& f, const Ptr* ptr, unsigned ldm, bool row_major_memory) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.tile[r * F::cols + c] = element_to_float(row_major_memory ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  load_tile(f, ptr, ldm, std::is_same<Layout, row_major>::value);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  load_tile(f, ptr, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float result[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.tile[i * N + j];
      for (int kk = 0; kk < K; ++kk) acc += a.tile[i * K + kk] * b.tile[kk * N + j];
      result[i * N + j] = acc;
    }
  std::memcpy(d.tile, result, sizeof(result));
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (simt::lane() != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.tile[r * N + c];
}
}  // namespace wmma
}  // namespace nvcuda

#define SOFTPROMPT_LAUNCH(kernel, grid, block, smem, stream, ...) ::simt::launch(kernel, grid, block, smem, __VA_ARGS__)
