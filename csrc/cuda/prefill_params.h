// Tile shapes and shared-memory plan of the CUDA prefill (long Lq) forward kernel. Plain C++.
//
// A block computes BM = 64 queries of one (row, q head); each of its 4 warps owns 16 query
// rows. Keys come in tiles of BN: first the row's prefix slots, then its sequence keys up to
// the causal limit of the block's last query. Q.K^T and P.V run on tensor cores (WMMA
// 16x16x16, fp32 accumulation); the softmax reads the score tile from shared memory, and the
// running output lives in shared memory as fp32 (no dependence on fragment layouts).
#pragma once

#include <cstddef>
#include <cstdint>

namespace softprompt {
namespace cuda {

constexpr int kPrefillRows = 64;    // BM
constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;

template <int D>
struct PrefillTile {
  static constexpr int kKeys = D <= 128 ? 64 : 32;  // BN
  // Leading dimensions padded by 16 bytes (bank spread); multiples of 8 (16-bit) / 4 (fp32) as WMMA needs.
  static constexpr int kLdQ = D + 8, kLdK = D + 8, kLdP = kKeys + 8;
  static constexpr int kLdS = kKeys + 4, kLdO = D + 4;
  static constexpr size_t align(size_t bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr size_t kQBytes = align(size_t(kPrefillRows) * kLdQ * 2);
  static constexpr size_t kKBytes = align(size_t(kKeys) * kLdK * 2);
  static constexpr size_t kSBytes = align(size_t(kPrefillWarps) * 16 * kLdS * 4);
  static constexpr size_t kPBytes = align(size_t(kPrefillWarps) * 16 * kLdP * 2);
  static constexpr size_t kOBytes = align(size_t(kPrefillWarps) * 16 * kLdO * 4);
  // q, k, v, scores, probabilities, outputs
  static constexpr size_t kSmemBytes = kQBytes + 2 * kKBytes + kSBytes + kPBytes + kOBytes;
};


}  // namespace cuda
}  // namespace softprompt
