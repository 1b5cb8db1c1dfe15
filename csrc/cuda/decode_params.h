// Parameters and launch plan of the split-K decode kernel (plain C++, no CUDA or torch headers).
//
// The decode kernel serves prefix_attention when Lq <= kDecodeMaxQueries: each row's
// queries attend to its prompt's prefix slots (bank [P, Hkv, K, D]) and its own
// cached keys [B, Hkv, Lk, D]. The combined key axis of a row is
//   c in [0, K)        prefix slot c (visible iff c < prefix_len(prompt of the row))
//   c in [K, K + Lk)   sequence key j = c - K (visible per padding mask and causality)
// and is cut into num_splits ranges of keys_per_split keys (flash-decoding); each
// split writes a normalised partial output and its lse, and a combine pass merges
// them. The plan depends only on shapes and the SM count (never on device data), so
// a launch needs no host synchronisation and can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "prefix_attention/params.h"

namespace softprompt {
namespace cuda {

constexpr int kDecodeMaxQueries = 16;  // Lq at most this goes to the decode kernel
constexpr int kDecodeKeyTile = 64;     // keys per tile inside a split
constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxSplits = 64;

struct DecodeParams {
  PrefixAttentionParams attn;
  // Workspace, contiguous, used only when num_splits > 1:
  float* partial_out;  // [num_splits, B, Hq, Lq, D] each split's output, already normalised
  float* partial_lse;  // [num_splits, B, Hq, Lq]    each split's lse in log2 units, -inf when empty
  int num_splits;
  int keys_per_split;  // multiple of kDecodeKeyTile
  int query_block;     // query vectors (q head x position within one kv head's group) per block
  int query_tiles;     // ceil(group * Lq / query_block)
};

struct DecodePlan {
  int num_splits, keys_per_split, query_block, query_tiles;
};

// Query vectors per block: the group's q heads times Lq, rounded to the kernel's sizes.
inline int decode_query_block(int64_t group, int64_t len_q) {
  const int64_t n = group * len_q;
  return n <= 1 ? 1 : (n <= 4 ? 4 : 8);
}

// Cuts total_keys into about `splits` ranges of whole key tiles (at least one tile each).
inline void split_keys(DecodePlan& plan, int64_t total_keys, int64_t splits) {
  int64_t per_split = (total_keys + splits - 1) / splits;
  per_split = (per_split + kDecodeKeyTile - 1) / kDecodeKeyTile * kDecodeKeyTile;
  if (per_split < kDecodeKeyTile) per_split = kDecodeKeyTile;
  plan.keys_per_split = int(per_split);
  plan.num_splits = int(total_keys > 0 ? (total_keys + per_split - 1) / per_split : 1);
}

// Enough blocks for about two waves on num_sms, but no split shorter than two key tiles.
inline DecodePlan plan_decode(const PrefixAttentionParams& p, int num_sms) {
  DecodePlan plan{};
  const int64_t group = p.heads_q / p.heads_kv;
  plan.query_block = decode_query_block(group, p.len_q);
  plan.query_tiles = int((group * p.len_q + plan.query_block - 1) / plan.query_block);
  const int64_t total_keys = p.prefix_slots + p.len_k;
  const int64_t base_blocks = p.batch * p.heads_kv * plan.query_tiles;
  int64_t splits = base_blocks > 0 ? (2 * int64_t(num_sms) + base_blocks - 1) / base_blocks : 1;
  const int64_t max_by_length = (total_keys + 2 * kDecodeKeyTile - 1) / (2 * kDecodeKeyTile);
  splits = splits < max_by_length ? splits : max_by_length;
  splits = splits < kDecodeMaxSplits ? splits : kDecodeMaxSplits;
  splits = splits < 1 ? 1 : splits;
  split_keys(plan, total_keys, splits);
  return plan;
}

// Same plan with the split count forced (tests use it to cover the combine pass).
inline DecodePlan plan_decode_with_splits(const PrefixAttentionParams& p, int num_splits) {
  DecodePlan plan = plan_decode(p, 1);
  split_keys(plan, p.prefix_slots + p.len_k, num_splits);
  return plan;
}

}  // namespace cuda
}  // namespace softprompt
