// Prefill forward of prefix attention on tensor cores (WMMA, sm_80+): FlashAttention-2's loop
// over key tiles with an online softmax, over the row's prefix slots and then its sequence.
// See prefill_params.h for the tiling. Keys that do not exist or are padding are zero-filled
// in shared memory and masked to -inf, so garbage in padded slots never reaches the output.
#pragma once

#include "cuda/cuda_compat.h"
#include "cuda/decode_kernel.cuh"  // RowPrefix, row_prefix, key_is_real, kLog2e, kLn2
#include "cuda/prefill_params.h"

namespace softprompt {
namespace cuda {

// Copies `rows` rows of D elements (16-byte chunks) into shared memory with leading dimension
// ld; rows for which row_ptr returns null are zero-filled.
template <typename T, int D, typename RowPtr>
__device__ __forceinline__ void load_tile_rows(T* dst, int ld, int rows, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += kPrefillThreads) {
    const int r = idx / kChunks, chunk = idx % kChunks;
    const T* src = row_ptr(r);
    uint4 value = {0u, 0u, 0u, 0u};
    if (src != nullptr) value = *reinterpret_cast<const uint4*>(src + chunk * 8);
    *reinterpret_cast<uint4*>(dst + r * ld + chunk * 8) = value;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefix_prefill_kernel(const PrefixAttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the binding refuses older devices before launching
#else
  namespace wmma = nvcuda::wmma;
  using Tile = PrefillTile<D>;
  constexpr int BM = kPrefillRows, BN = Tile::kKeys;
  constexpr int kHalfCols = BN / 2, kHalfDim = D / 2;

  SOFTPROMPT_DYNAMIC_SMEM(uint4, smem_raw);
  char* smem = reinterpret_cast<char*>(smem_raw);
  T* q_s = reinterpret_cast<T*>(smem);                       // [BM][kLdQ]
  T* k_s = reinterpret_cast<T*>(smem + Tile::kQBytes);       // [BN][kLdK]
  T* v_s = reinterpret_cast<T*>(smem + Tile::kQBytes + Tile::kKBytes);
  char* per_warp = smem + Tile::kQBytes + 2 * Tile::kKBytes;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  float* s_w = reinterpret_cast<float*>(per_warp) + warp * 16 * Tile::kLdS;                    // [16][kLdS]
  T* p_w = reinterpret_cast<T*>(per_warp + Tile::kSBytes) + warp * 16 * Tile::kLdP;            // [16][kLdP]
  float* o_w = reinterpret_cast<float*>(per_warp + Tile::kSBytes + Tile::kPBytes) + warp * 16 * Tile::kLdO;

  const int64_t Lq = p.len_q, Lk = p.len_k;
  const int64_t q_tiles = (Lq + BM - 1) / BM;
  const int64_t tile = int64_t(blockIdx.x) % q_tiles;
  const int64_t h = (int64_t(blockIdx.x) / q_tiles) % p.heads_q;
  const int64_t b = int64_t(blockIdx.x) / (q_tiles * p.heads_q);
  const int64_t kvh = h / (p.heads_q / p.heads_kv);
  const int64_t i0 = tile * BM;
  const RowPrefix prefix = row_prefix(p, b);
  const int64_t prompt = prefix.bad ? -1 : prefix.prompt, plen = prefix.bad ? 0 : prefix.len;
  const int64_t last_row = i0 + BM - 1 < Lq - 1 ? i0 + BM - 1 : Lq - 1;
  const int64_t seq_end = p.causal ? (last_row + Lk - Lq + 1 < Lk ? last_row + Lk - Lq + 1 : Lk) : Lk;

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
  load_tile_rows<T, D>(q_s, Tile::kLdQ, BM, [&](int r) -> const T* {
    return i0 + r < Lq ? q_base + (i0 + r) * p.q_strides.l : nullptr;
  });

  // This lane's softmax row and column half; both lanes of a row keep the row's m and l.
  const int row = lane / 2, half = lane % 2;
  const int64_t i = i0 + warp * 16 + row;
  float m_row = -INFINITY, l_row = 0.f;
  for (int c = half * kHalfDim; c < (half + 1) * kHalfDim; ++c) o_w[row * Tile::kLdO + c] = 0.f;
  const float scale_log2 = float(p.scale) * kLog2e;

  const int64_t prefix_tiles = (plen + BN - 1) / BN;
  const int64_t seq_tiles = (seq_end + BN - 1) / BN;
  for (int64_t t = 0; t < prefix_tiles + seq_tiles; ++t) {
    const bool in_prefix = t < prefix_tiles;
    const int64_t key0 = in_prefix ? t * BN : (t - prefix_tiles) * BN;
    __syncthreads();  // every warp is done with the previous k_s / v_s (and q_s is loaded)
    auto key_row = [&](const void* seq, const Strides4& ss, const void* bank, const Strides4& bs, int r) -> const T* {
      const int64_t key = key0 + r;
      if (in_prefix) return key < plen ? static_cast<const T*>(bank) + prompt * bs.b + kvh * bs.h + key * bs.l : nullptr;
      if (key >= seq_end || !key_is_real(p, b, key)) return nullptr;
      return static_cast<const T*>(seq) + b * ss.b + kvh * ss.h + key * ss.l;
    };
    load_tile_rows<T, D>(k_s, Tile::kLdK, BN, [&](int r) { return key_row(p.k, p.k_strides, p.prefix_k, p.pk_strides, r); });
    load_tile_rows<T, D>(v_s, Tile::kLdK, BN, [&](int r) { return key_row(p.v, p.v_strides, p.prefix_v, p.pv_strides, r); });
    __syncthreads();

    // S = Q_w K^T for this warp's 16 rows
    for (int n = 0; n < BN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, q_s + (warp * 16) * Tile::kLdQ + kk * 16, Tile::kLdQ);
        wmma::load_matrix_sync(bt, k_s + (n * 16) * Tile::kLdK + kk * 16, Tile::kLdK);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(s_w + n * 16, acc, Tile::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax of row `row` over this lane's half of the tile's keys
    float s_local[kHalfCols];
    float tile_max = -INFINITY;
    for (int cc = 0; cc < kHalfCols; ++cc) {
      const int col = half * kHalfCols + cc;
      const int64_t key = key0 + col;
      bool visible = i < Lq;
      if (in_prefix) visible = visible && key < plen;
      else visible = visible && key < Lk && key_is_real(p, b, key) && (!p.causal || key <= i + Lk - Lq);
      const float s = visible ? s_w[row * Tile::kLdS + col] * scale_log2 : -INFINITY;
      s_local[cc] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_row, tile_max);
    const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_row - m_new);
    float row_sum = 0.f;
    for (int cc = 0; cc < kHalfCols; ++cc) {
      const float pr = m_new == -INFINITY ? 0.f : exp2f(s_local[cc] - m_new);
      row_sum += pr;
      p_w[row * Tile::kLdP + half * kHalfCols + cc] = from_float<T>(pr);
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    l_row = l_row * alpha + row_sum;
    m_row = m_new;
    for (int c = half * kHalfDim; c < (half + 1) * kHalfDim; ++c) o_w[row * Tile::kLdO + c] *= alpha;
    __syncwarp();

    // O_w += P_w V
    for (int dn = 0; dn < D / 16; ++dn) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_w + dn * 16, Tile::kLdO, wmma::mem_row_major);
      for (int kk = 0; kk < BN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
        wmma::load_matrix_sync(a, p_w + kk * 16, Tile::kLdP);
        wmma::load_matrix_sync(vb, v_s + (kk * 16) * Tile::kLdK + dn * 16, Tile::kLdK);
        wmma::mma_sync(acc, a, vb, acc);
      }
      wmma::store_matrix_sync(o_w + dn * 16, acc, Tile::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (i < Lq) {
    T* out = static_cast<T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h + i * p.out_strides.l;
    const float inv_l = l_row > 0.f ? 1.f / l_row : 0.f;
    for (int c = half * kHalfDim; c < (half + 1) * kHalfDim; ++c)
      out[c] = from_float<T>(prefix.bad ? NAN : o_w[row * Tile::kLdO + c] * inv_l);
    if (half == 0) {
      const float lse = prefix.bad ? NAN : (l_row > 0.f ? (m_row + log2f(l_row)) * kLn2 : -INFINITY);
      static_cast<float*>(p.lse)[(b * p.heads_q + h) * Lq + i] = lse;
    }
  }
#endif
}

template <typename T, int D>
cudaError_t run_prefix_prefill(const PrefixAttentionParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.len_q + kPrefillRows - 1) / kPrefillRows * p.heads_q * p.batch;
  if (blocks == 0) return cudaSuccess;
  const size_t smem = PrefillTile<D>::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(prefix_prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(smem));
  if (err != cudaSuccess) return err;
  SOFTPROMPT_LAUNCH((prefix_prefill_kernel<T, D>), dim3(static_cast<unsigned>(blocks)), dim3(kPrefillThreads), smem,
                    stream, p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace softprompt
