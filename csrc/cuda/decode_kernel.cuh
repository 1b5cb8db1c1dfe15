// Split-K decode kernel of prefix attention (flash-decoding over prefix + cache) and its combine pass.
//
// One block = (split, query tile, kv head, row). A query tile holds up to QB query
// vectors of one kv head's group (q heads x positions), so the group shares every
// key and value load (GQA). Keys of a split are processed in tiles of 64:
//   1. scores: D/8 lanes per key, each with one 16-byte load, dot products against
//      all QB queries (held in shared memory, pre-scaled to log2 units), reduced by
//      shuffles;
//   2. online softmax per query vector (one warp per vector);
//   3. P.V: thread = (16-byte chunk of the head dim, key slice), accumulating QB x 8
//      outputs in registers; slices are summed once per split.
// Keys that do not exist or are padding are never loaded (so garbage in padded cache
// slots cannot leak in as 0 * NaN). Rows whose prompt id or prefix length is out of
// range get NaN outputs instead of reading out of bounds.
// Modern-attention features (docs/DESIGN.md section 2): a sliding window skips the tiles
// before the earliest query's reach and masks per query; soft-capping maps each score
// through cap * tanh(s / cap); attention sinks join the normaliser where the output is
// normalised (the single split's epilogue, or the combine pass, as one more split).
#pragma once

#include "cuda/cuda_compat.h"
#include "cuda/decode_params.h"

namespace softprompt {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The row's prompt and its valid prefix length; bad = ids or lengths out of range.
struct RowPrefix {
  int64_t prompt, len;
  bool bad;
};

__device__ __forceinline__ RowPrefix row_prefix(const PrefixAttentionParams& p, int64_t b) {
  RowPrefix r{-1, 0, false};
  if (p.num_prompts == 0 || p.prefix_slots == 0) {
    if (p.prompt_ids != nullptr) r.bad = p.prompt_ids[b] < -1 || p.prompt_ids[b] >= p.num_prompts;
    return r;
  }
  const int64_t prompt = p.prompt_ids ? p.prompt_ids[b] : 0;
  if (prompt < -1 || prompt >= p.num_prompts) {
    r.bad = true;
    return r;
  }
  if (prompt < 0) return r;
  const int64_t len = p.prefix_lens ? p.prefix_lens[prompt] : p.prefix_slots;
  if (len < 0 || len > p.prefix_slots) {
    r.bad = true;
    return r;
  }
  r.prompt = prompt;
  r.len = len;
  return r;
}

__device__ __forceinline__ bool key_is_real(const PrefixAttentionParams& p, int64_t b, int64_t j) {
  return p.key_padding_mask == nullptr || p.key_padding_mask[b * p.mask_stride_b + j * p.mask_stride_l];
}

// Row c of the combined key axis (prefix slots, then the sequence) of (row b, kv head h).
template <typename T>
__device__ __forceinline__ const T* combined_row(const void* seq, const Strides4& ss, const void* bank,
                                                 const Strides4& bs, int64_t K, int64_t b, int64_t h,
                                                 int64_t prompt, int64_t c) {
  if (c < K) return static_cast<const T*>(bank) + prompt * bs.b + h * bs.h + c * bs.l;
  return static_cast<const T*>(seq) + b * ss.b + h * ss.h + (c - K) * ss.l;
}

// A normalised output o with base-2 log-sum-exp lse2, merged with a sink logit (base 2): the
// factor that rescales o, and the new lse2.
__device__ __forceinline__ void merge_sink(float sink2, float& lse2, float& factor) {
  const float m = fmaxf(lse2, sink2);
  const float w_out = lse2 == -INFINITY ? 0.f : exp2f(lse2 - m);
  const float total = w_out + exp2f(sink2 - m);
  factor = w_out / total;
  lse2 = m + log2f(total);
}

template <typename T, int D, int QB>
__global__ void __launch_bounds__(kDecodeThreads, 2) prefix_decode_split_kernel(const DecodeParams params) {
  static_assert(D == 64 || D == 128 || D == 256, "decode head dims are 64, 128 and 256");
  constexpr int kChunks = D / 8;  // 16-byte chunks per row; also the lanes cooperating on one key
  constexpr int kKeysPerWarp = kWarpSize / kChunks;
  constexpr int kWarps = kDecodeThreads / kWarpSize;
  constexpr int kKeysPerPass = kWarps * kKeysPerWarp;
  constexpr int kSlices = kDecodeThreads / kChunks;  // key slices of the P.V phase
  constexpr int kTile = kDecodeKeyTile;
  static_assert(kTile == 2 * kWarpSize && kTile % kKeysPerPass == 0 && kTile % kSlices == 0, "tile shape");
  constexpr int kPasses = kTile / kKeysPerPass;          // K loads per lane per tile
  constexpr int kValuesPerThread = kTile / kSlices;      // V loads per thread per tile

  __shared__ __align__(16) float q_s[QB][D];  // queries x scale x log2(e)
  __shared__ float p_s[QB][kTile];            // scores, then probabilities, of the current tile
  __shared__ bool live_s[kTile];              // key exists, is real, and is in this split
  __shared__ float m_s[QB], l_s[QB], alpha_s[QB];
  __shared__ __align__(16) float red_s[kSlices][QB][D];  // P.V partials of the key slices

  const PrefixAttentionParams& p = params.attn;
  int64_t block = blockIdx.x;
  const int split = int(block % params.num_splits);
  block /= params.num_splits;
  const int qtile = int(block % params.query_tiles);
  block /= params.query_tiles;
  const int64_t kvh = block % p.heads_kv;
  const int64_t b = block / p.heads_kv;

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int group = int(p.heads_q / p.heads_kv);
  const int num_qv = group * int(p.len_q);
  const int qv0 = qtile * QB;
  const int64_t K = p.prefix_slots, Lk = p.len_k, Lq = p.len_q;
  const RowPrefix prefix = row_prefix(p, b);
  const int64_t prompt = prefix.bad ? -1 : prefix.prompt, plen = prefix.bad ? 0 : prefix.len;

  const float qscale = float(p.scale) * kLog2e;
  for (int idx = tid; idx < QB * kChunks; idx += kDecodeThreads) {
    const int r = idx / kChunks, chunk = idx % kChunks, qv = qv0 + r;
    float vals[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (qv < num_qv) {
      const int64_t h = kvh * group + qv % group, i = qv / group;
      const T* src = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h + i * p.q_strides.l;
      unpack8<T>(*reinterpret_cast<const uint4*>(src + chunk * 8), vals);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) q_s[r][chunk * 8 + e] = vals[e] * qscale;
  }
  if (tid < QB) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }

  // Keys this block may need: its split's range, prefix slots < plen, sequence keys up to the
  // causal limit of the tile's last position.
  const int64_t c_begin = int64_t(split) * params.keys_per_split;
  const int64_t c_end_split = c_begin + params.keys_per_split < K + Lk ? c_begin + params.keys_per_split : K + Lk;
  const int64_t last_pos = (qv0 + QB - 1) / group < Lq - 1 ? (qv0 + QB - 1) / group : Lq - 1;
  const int64_t seq_end = p.causal ? (last_pos + Lk - Lq + 1 < Lk ? last_pos + Lk - Lq + 1 : Lk) : Lk;
  // With a sliding window, nothing below the earliest query's reach (window index `reach`; prefix
  // slot c sits at c - plen + the row's prefix offset, sequence key j at j) is visible to the tile.
  const int64_t reach = p.window > 0 ? int64_t(qv0 / group) + Lk - Lq - p.window + 1 : INT64_MIN / 2;
  const int64_t prefix_shift = p.prefix_offsets ? p.prefix_offsets[b] : 0;  // slot c sits at c - plen + shift
  const int64_t prefix_begin = reach + plen - prefix_shift > 0 ? reach + plen - prefix_shift : 0;
  const int64_t seq_begin = K + (reach > 0 ? reach : 0);
  // Soft-capping in base-2 units: s2 -> cap2 * tanh(s2 / cap2), cap2 = cap * log2(e).
  const float cap2 = float(p.softcap) * kLog2e, inv_cap2 = p.softcap > 0 ? 1.f / cap2 : 0.f;

  const int chunk = tid % kChunks, slice = tid / kChunks;
  float acc[QB][8];
#pragma unroll
  for (int r = 0; r < QB; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;

  for (int64_t t0 = c_begin; t0 < c_end_split; t0 += kTile) {
    const int64_t t1 = t0 + kTile;
    const bool any_prefix = t1 > prefix_begin && t0 < plen;
    const bool any_sequence = t1 > seq_begin && t0 < K + seq_end;
    if (!any_prefix && !any_sequence) continue;  // uniform over the block
    __syncthreads();  // the previous tile's readers of p_s / live_s are done
    if (tid < kTile) {
      const int64_t c = t0 + tid;
      bool live = c < c_end_split;
      if (live)
        live = c < K ? (c >= prefix_begin && c < plen) : (c >= seq_begin && c - K < seq_end && key_is_real(p, b, c - K));
      live_s[tid] = live;
    }
    __syncthreads();

    // 1. scores: every K load of the tile is issued before the first one is used
    const int sub = lane % kChunks;
    uint4 k_raw[kPasses];
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int t = pass * kKeysPerPass + warp * kKeysPerWarp + lane / kChunks;
      k_raw[pass] = make_uint4(0u, 0u, 0u, 0u);
      if (live_s[t]) {
        const T* row = combined_row<T>(p.k, p.k_strides, p.prefix_k, p.pk_strides, K, b, kvh, prompt, t0 + t);
        k_raw[pass] = *reinterpret_cast<const uint4*>(row + sub * 8);
      }
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int t = pass * kKeysPerPass + warp * kKeysPerWarp + lane / kChunks;
      const int64_t c = t0 + t;
      float kv[8];
      unpack8<T>(k_raw[pass], kv);
      float dots[QB];
#pragma unroll
      for (int r = 0; r < QB; ++r) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s += q_s[r][sub * 8 + e] * kv[e];
        dots[r] = s;
      }
#pragma unroll
      for (int offset = kChunks / 2; offset > 0; offset >>= 1)
#pragma unroll
        for (int r = 0; r < QB; ++r) dots[r] += __shfl_xor_sync(0xffffffffu, dots[r], offset);
      if (sub == 0) {
        const bool live = live_s[t];
        const int64_t key_index = c < K ? c - plen + prefix_shift : c - K;  // the key's window index
#pragma unroll
        for (int r = 0; r < QB; ++r) {
          const int qv = qv0 + r;
          const int64_t query_index = int64_t(qv / group) + Lk - Lq;
          bool visible = live && qv < num_qv;
          if (visible && c >= K && p.causal) visible = (c - K) <= query_index;
          if (visible && p.window > 0) visible = query_index - key_index < p.window;
          const float s = p.softcap > 0 ? cap2 * tanhf(dots[r] * inv_cap2) : dots[r];
          p_s[r][t] = visible ? s : -INFINITY;
        }
      }
    }

    // V loads of this thread's keys go out now, to arrive while the softmax runs
    uint4 v_raw[kValuesPerThread];
#pragma unroll
    for (int n = 0; n < kValuesPerThread; ++n) {
      const int t = slice + n * kSlices;
      v_raw[n] = make_uint4(0u, 0u, 0u, 0u);
      if (live_s[t]) {
        const T* row = combined_row<T>(p.v, p.v_strides, p.prefix_v, p.pv_strides, K, b, kvh, prompt, t0 + t);
        v_raw[n] = *reinterpret_cast<const uint4*>(row + chunk * 8);
      }
    }
    __syncthreads();

    // 2. online softmax, one warp per query vector
    for (int r = warp; r < QB; r += kWarps) {
      const float s0 = p_s[r][lane], s1 = p_s[r][lane + kWarpSize];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
      float p0 = 0.f, p1 = 0.f, alpha = 1.f;
      if (m_new != -INFINITY) {
        p0 = exp2f(s0 - m_new);
        p1 = exp2f(s1 - m_new);
        alpha = exp2f(m_old - m_new);
      }
      const float tile_sum = warp_sum(p0 + p1);
      p_s[r][lane] = p0;
      p_s[r][lane + kWarpSize] = p1;
      if (lane == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + tile_sum;
        alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // 3. P.V (keys that are not live hold zeros and probability 0)
#pragma unroll
    for (int r = 0; r < QB; ++r) {
      const float alpha = alpha_s[r];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
    }
#pragma unroll
    for (int n = 0; n < kValuesPerThread; ++n) {
      const int t = slice + n * kSlices;
      float vv[8];
      unpack8<T>(v_raw[n], vv);
#pragma unroll
      for (int r = 0; r < QB; ++r) {
        const float pr = p_s[r][t];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] += pr * vv[e];
      }
    }
  }

  // Sum the key slices; normalise; write the output (one split) or this split's partial.
#pragma unroll
  for (int r = 0; r < QB; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) red_s[slice][r][chunk * 8 + e] = acc[r][e];
  __syncthreads();
  const int64_t vectors = p.batch * p.heads_q * Lq;
  for (int idx = tid; idx < QB * D; idx += kDecodeThreads) {
    const int r = idx / D, d = idx % D, qv = qv0 + r;
    if (qv >= num_qv) continue;
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kSlices; ++s) sum += red_s[s][r][d];
    const float l = l_s[r], m = m_s[r];
    float o = prefix.bad ? NAN : (l > 0.f ? sum / l : 0.f);
    float lse2 = prefix.bad ? NAN : (l > 0.f ? m + log2f(l) : -INFINITY);
    const int64_t h = kvh * group + qv % group, i = qv / group;
    const int64_t vec = (b * p.heads_q + h) * Lq + i;
    if (params.num_splits == 1) {
      if (p.sinks != nullptr && !prefix.bad) {
        float factor;
        merge_sink(static_cast<const float*>(p.sinks)[h] * kLog2e, lse2, factor);
        o *= factor;
      }
      T* out = static_cast<T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h + i * p.out_strides.l;
      out[d] = from_float<T>(o);
      if (d == 0) static_cast<float*>(p.lse)[vec] = lse2 * kLn2;
    } else {
      params.partial_out[(split * vectors + vec) * D + d] = o;
      if (d == 0) params.partial_lse[split * vectors + vec] = lse2;
    }
  }
}

// Merges the splits' partial outputs by their lse; one warp per (row, q head, position).
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) prefix_decode_combine_kernel(const DecodeParams params) {
  constexpr int kPerLane = D / kWarpSize;
  const PrefixAttentionParams& p = params.attn;
  const int64_t vectors = p.batch * p.heads_q * p.len_q;
  const int64_t vec = int64_t(blockIdx.x) * (kDecodeThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (vec >= vectors) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = vec % p.len_q, h = (vec / p.len_q) % p.heads_q, b = vec / (p.len_q * p.heads_q);
  // An attention sink is one more split: its lse is the sink's logit, its output zero.
  const float sink2 = p.sinks != nullptr ? static_cast<const float*>(p.sinks)[h] * kLog2e : -INFINITY;
  float m = sink2;
  bool nan_seen = false;
  for (int s = 0; s < params.num_splits; ++s) {
    const float lse = params.partial_lse[s * vectors + vec];
    nan_seen |= lse != lse;
    m = fmaxf(m, lse);
  }
  float acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = 0.f;
  float weight_sum = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < params.num_splits; ++s) {
      const float w = exp2f(params.partial_lse[s * vectors + vec] - m);
      if (w == 0.f) continue;  // an empty split holds zeros; skip the reads
      weight_sum += w;
      const float* part = params.partial_out + (s * vectors + vec) * D;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[j] += w * part[lane + j * kWarpSize];
    }
    if (p.sinks != nullptr) weight_sum += exp2f(sink2 - m);
  }
  T* out = static_cast<T*>(p.out) + b * p.out_strides.b + h * p.out_strides.h + i * p.out_strides.l;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const float o = nan_seen ? NAN : (weight_sum > 0.f ? acc[j] / weight_sum : 0.f);
    out[lane + j * kWarpSize] = from_float<T>(o);
  }
  if (lane == 0) {
    const float lse = nan_seen ? NAN : (weight_sum > 0.f ? (m + log2f(weight_sum)) * kLn2 : -INFINITY);
    static_cast<float*>(p.lse)[vec] = lse;
  }
}

template <typename T, int D>
cudaError_t run_prefix_decode(const DecodeParams& params, cudaStream_t stream) {
  const PrefixAttentionParams& p = params.attn;
  const int64_t blocks = int64_t(params.num_splits) * params.query_tiles * p.heads_kv * p.batch;
  if (blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kDecodeThreads);
  switch (params.query_block) {
    case 1: SOFTPROMPT_LAUNCH((prefix_decode_split_kernel<T, D, 1>), grid, block, 0, stream, params); break;
    case 4: SOFTPROMPT_LAUNCH((prefix_decode_split_kernel<T, D, 4>), grid, block, 0, stream, params); break;
    default: SOFTPROMPT_LAUNCH((prefix_decode_split_kernel<T, D, 8>), grid, block, 0, stream, params); break;
  }
  if (params.num_splits > 1) {
    const int64_t vectors = p.batch * p.heads_q * p.len_q;
    const int per_block = kDecodeThreads / kWarpSize;
    const dim3 combine_grid(static_cast<unsigned>((vectors + per_block - 1) / per_block));
    SOFTPROMPT_LAUNCH((prefix_decode_combine_kernel<T, D>), combine_grid, block, 0, stream, params);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace softprompt
