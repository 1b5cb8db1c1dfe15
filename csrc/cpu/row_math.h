// Row operations of the online softmax, in the accumulation type.
//
// Compiled for AVX-512, AVX2+FMA and baseline x86-64 (GCC picks one at load
// time through target_clones), so the exponentials vectorise on any machine
// without building the whole extension for one instruction set. The float
// exponential (exp_approx) is a power-of-two reduction plus a degree-5 polynomial:
// relative error below 3e-7 on [-1, 1], 1e-6 on [-10, 10] and 1e-5 down to -86.5;
// below -86.5 (values under 3e-38), masked scores (-inf) included, it is exactly 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SOFTPROMPT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOFTPROMPT_MULTIVERSION
#endif
// Bodies shared by the clones: inlined into each, so each is compiled for the clone's instruction set.
#if defined(__GNUC__)
#define SOFTPROMPT_INLINE_BODY inline __attribute__((always_inline))
#else
#define SOFTPROMPT_INLINE_BODY inline
#endif

namespace softprompt::cpu {

// exp(x) = 2^t, t = x * log2(e) = n + f with n = round(t), |f| <= 1/2: 2^f from a degree-5 polynomial
// (near-minimax with 2^0 = 1 exact; relative error 1.9e-7 in float), 2^n added to its exponent bits. Short
// and branch-free so that a vector of 16 costs about 15 instructions: with head dims of 32-64 the
// exponentials cost a large fraction of the score products.
SOFTPROMPT_INLINE_BODY float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t + kRound holds round(t) in its low mantissa bits
  float t = x * kLog2e;
  t = t < -125.0f ? -125.0f : t;  // keeps 2^n a normal float (and -inf finite): x < -86.5 gives 0 below
  t = t > 127.0f ? 127.0f : t;    // (both written so that a NaN passes through)
  const float shifted = t + kRound;
  const float n = shifted - kRound;
  const float f = t - n;
  float p = 1.326472731307149e-3f;
  p = p * f + 9.671512991189957e-3f;
  p = p * f + 5.550733581185341e-2f;
  p = p * f + 2.4022242426872253e-1f;
  p = p * f + 6.931470036506653e-1f;
  p = p * f + 1.0f;  // exactly 1 at x = 0
  uint32_t p_bits, shifted_bits;
  std::memcpy(&p_bits, &p, sizeof(p));
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted));
  p_bits += shifted_bits << 23;  // the low 9 bits of shifted hold n (two's complement): exponent += n
  float result;
  std::memcpy(&result, &p_bits, sizeof(result));
  result = x != x ? x : result;  // NaN in, NaN out: a NaN score must not vanish from the softmax
  return x < -86.5f ? 0.0f : result;
}
SOFTPROMPT_INLINE_BODY float exp_of(float x) { return exp_approx(x); }
SOFTPROMPT_INLINE_BODY double exp_of(double x) { return std::exp(x); }

// Score rows are padded to a multiple of kLanes (see the chunk passes below).
constexpr int64_t kLanes = 16;

// The softmax passes run on vectors of kVec floats, written with GCC's vector extensions rather
// than left to the auto-vectoriser: it kept the max, the exponential and the sum of these loops
// scalar (the selects and bit casts defeat it), and the softmax then cost more than both block
// products together. 8 floats is one ymm register (AVX2 and AVX-512 clones) or two xmm (baseline);
// wider vectors made GCC spill them to the stack on AVX2.
#if defined(__GNUC__)
#define SOFTPROMPT_VECTOR_MATH 1
constexpr int64_t kVec = 8;
typedef float VecF __attribute__((vector_size(kVec * sizeof(float))));
typedef uint32_t VecU __attribute__((vector_size(kVec * sizeof(float))));
SOFTPROMPT_INLINE_BODY VecF splat(float x) { return VecF{} + x; }
SOFTPROMPT_INLINE_BODY VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SOFTPROMPT_INLINE_BODY void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
SOFTPROMPT_INLINE_BODY float reduce_max(VecF v) {
  float m = v[0];
  for (int64_t q = 1; q < kVec; ++q) m = v[q] > m ? v[q] : m;
  return m;
}
SOFTPROMPT_INLINE_BODY float reduce_sum(VecF v) {
  float s = 0.0f;
  for (int64_t q = 0; q < kVec; ++q) s += v[q];
  return s;
}
// exp_approx on every lane, the same steps as the scalar version.
SOFTPROMPT_INLINE_BODY VecF exp_approx(VecF x) {
  const VecF t0 = x * splat(1.44269504088896341f);
  VecF t = t0 < splat(-125.0f) ? splat(-125.0f) : t0;
  t = t > splat(127.0f) ? splat(127.0f) : t;
  const VecF shifted = t + splat(12582912.0f);
  const VecF n = shifted - splat(12582912.0f);
  const VecF f = t - n;
  VecF p = splat(1.326472731307149e-3f);
  p = p * f + splat(9.671512991189957e-3f);
  p = p * f + splat(5.550733581185341e-2f);
  p = p * f + splat(2.4022242426872253e-1f);
  p = p * f + splat(6.931470036506653e-1f);
  p = p * f + splat(1.0f);
  const VecU bits = (VecU)p + ((VecU)shifted << 23);  // exponent += n, as in the scalar version
  VecF result = (VecF)bits;
  result = x != x ? x : result;
  return x < splat(-86.5f) ? splat(0.0f) : result;
}
#endif

SOFTPROMPT_MULTIVERSION
static float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  float acc = 0.0f;
  for (; j < n; ++j) acc += a[j] * b[j];
  for (int64_t l = 0; l < kLanes; ++l) acc += lanes[l];
  return acc;
}
static double dot(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// Whole-chunk softmax passes: one call per key chunk (not one per row), rows of whole vectors.
// The callers pad each score row to a multiple of kLanes with -inf (exp gives 0), so the loops
// below have no scalar tail in practice; the tail loops only keep them correct for any width.

template <typename T>
static SOFTPROMPT_INLINE_BODY T tree_max(T* lanes) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t q = 0; q < w; ++q) lanes[q] = lanes[q + w] > lanes[q] ? lanes[q + w] : lanes[q];
  return lanes[0];
}
template <typename T>
static SOFTPROMPT_INLINE_BODY T tree_sum(T* lanes) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t q = 0; q < w; ++q) lanes[q] += lanes[q + w];
  return lanes[0];
}

// Forward online-softmax step over one key chunk, s [rows, width] in place: per row r,
// m_new = max(m[r], max_j s), s <- exp(s - m_new), l[r] <- l[r] * alpha + sum(s), o[r, :D] *= alpha
// with alpha = exp(m[r] - m_new). A row with no finite score yet keeps m = -inf, l = 0; its s is 0.
template <typename T>
static SOFTPROMPT_INLINE_BODY void online_softmax_chunk_body(T* __restrict s, int64_t rows, int64_t width,
                                                             T* __restrict m, T* __restrict l, T* __restrict o,
                                                             int64_t D) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* s_row = s + r * width;
    T lanes[kLanes];
    for (int64_t q = 0; q < kLanes; ++q) lanes[q] = kNegInf;
    int64_t j = 0;
    for (; j + kLanes <= width; j += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) lanes[q] = s_row[j + q] > lanes[q] ? s_row[j + q] : lanes[q];
    T row_m = tree_max(lanes);
    for (; j < width; ++j) row_m = s_row[j] > row_m ? s_row[j] : row_m;
    row_m = m[r] > row_m ? m[r] : row_m;
    if (row_m == kNegInf) {  // nothing visible to this row yet
      for (int64_t c = 0; c < width; ++c) s_row[c] = T(0);
      continue;
    }
    for (int64_t q = 0; q < kLanes; ++q) lanes[q] = T(0);
    j = 0;
    for (; j + kLanes <= width; j += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        const T e = exp_of(s_row[j + q] - row_m);
        s_row[j + q] = e;
        lanes[q] += e;
      }
    T sum = tree_sum(lanes);
    for (; j < width; ++j) {
      s_row[j] = exp_of(s_row[j] - row_m);
      sum += s_row[j];
    }
    const T alpha = m[r] == kNegInf ? T(0) : exp_of(m[r] - row_m);
    l[r] = l[r] * alpha + sum;
    m[r] = row_m;
    if (alpha != T(1)) {
      T* o_row = o + r * D;
      for (int64_t d = 0; d < D; ++d) o_row[d] *= alpha;
    }
  }
}

// Backward over one key chunk, in place: s [rows, width] (scaled scores) becomes P = exp(s - lse[r])
// and dp [rows, width] (dO @ V^T) becomes dS = P * (dp - delta[r]); rows with lse = -inf saw
// nothing and get zeros.
template <typename T>
static SOFTPROMPT_INLINE_BODY void softmax_grad_chunk_body(T* __restrict s, T* __restrict dp, int64_t rows,
                                                           int64_t width, const T* __restrict lse,
                                                           const T* __restrict delta) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s_row = s + r * width;
    T* dp_row = dp + r * width;
    if (lse[r] == -std::numeric_limits<T>::infinity()) {
      for (int64_t c = 0; c < width; ++c) s_row[c] = dp_row[c] = T(0);
      continue;
    }
    const T row_lse = lse[r], row_delta = delta[r];
    for (int64_t c = 0; c < width; ++c) {
      const T p = exp_of(s_row[c] - row_lse);
      s_row[c] = p;
      dp_row[c] = p * (dp_row[c] - row_delta);
    }
  }
}

#if SOFTPROMPT_VECTOR_MATH
// online_softmax_chunk_body for float on whole vectors (width a multiple of kVec: the callers pad to kLanes).
SOFTPROMPT_INLINE_BODY void online_softmax_chunk_vec(float* __restrict s, int64_t rows, int64_t width,
                                                     float* __restrict m, float* __restrict l,
                                                     float* __restrict o, int64_t D) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* s_row = s + r * width;
    VecF lanes = splat(kNegInf);
    for (int64_t j = 0; j < width; j += kVec) {
      const VecF x = load_vec(s_row + j);
      lanes = x > lanes ? x : lanes;
    }
    float row_m = reduce_max(lanes);
    row_m = m[r] > row_m ? m[r] : row_m;
    if (row_m == kNegInf) {  // nothing visible to this row yet
      std::fill(s_row, s_row + width, 0.0f);
      continue;
    }
    VecF sums = splat(0.0f);
    const VecF shift = splat(row_m);
    for (int64_t j = 0; j < width; j += kVec) {
      const VecF e = exp_approx(load_vec(s_row + j) - shift);
      store_vec(s_row + j, e);
      sums += e;
    }
    const float alpha = m[r] == kNegInf ? 0.0f : exp_approx(m[r] - row_m);
    l[r] = l[r] * alpha + reduce_sum(sums);
    m[r] = row_m;
    if (alpha != 1.0f) {
      float* o_row = o + r * D;
      for (int64_t d = 0; d < D; ++d) o_row[d] *= alpha;
    }
  }
}

// softmax_grad_chunk_body for float on whole vectors.
SOFTPROMPT_INLINE_BODY void softmax_grad_chunk_vec(float* __restrict s, float* __restrict dp, int64_t rows,
                                                   int64_t width, const float* __restrict lse,
                                                   const float* __restrict delta) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s_row = s + r * width;
    float* dp_row = dp + r * width;
    if (lse[r] == -std::numeric_limits<float>::infinity()) {
      std::fill(s_row, s_row + width, 0.0f);
      std::fill(dp_row, dp_row + width, 0.0f);
      continue;
    }
    const VecF row_lse = splat(lse[r]), row_delta = splat(delta[r]);
    for (int64_t c = 0; c < width; c += kVec) {
      const VecF p = exp_approx(load_vec(s_row + c) - row_lse);
      store_vec(s_row + c, p);
      store_vec(dp_row + c, p * (load_vec(dp_row + c) - row_delta));
    }
  }
}
#endif

SOFTPROMPT_MULTIVERSION
static void online_softmax_chunk(float* s, int64_t rows, int64_t width, float* m, float* l, float* o,
                                 int64_t D) {
#if SOFTPROMPT_VECTOR_MATH
  if (width % kVec == 0) return online_softmax_chunk_vec(s, rows, width, m, l, o, D);
#endif
  online_softmax_chunk_body(s, rows, width, m, l, o, D);
}
static void online_softmax_chunk(double* s, int64_t rows, int64_t width, double* m, double* l, double* o,
                                 int64_t D) {
  online_softmax_chunk_body(s, rows, width, m, l, o, D);
}
SOFTPROMPT_MULTIVERSION
static void softmax_grad_chunk(float* s, float* dp, int64_t rows, int64_t width, const float* lse,
                               const float* delta) {
#if SOFTPROMPT_VECTOR_MATH
  if (width % kVec == 0) return softmax_grad_chunk_vec(s, dp, rows, width, lse, delta);
#endif
  softmax_grad_chunk_body(s, dp, rows, width, lse, delta);
}
static void softmax_grad_chunk(double* s, double* dp, int64_t rows, int64_t width, const double* lse,
                               const double* delta) {
  softmax_grad_chunk_body(s, dp, rows, width, lse, delta);
}

// Small block products (few query rows, e.g. decoding), each in one multiversioned call so that
// the inner loops vectorise without a dispatch per row or per key.
// s [m, n] = a [m, k] @ b [n, k]^T
SOFTPROMPT_MULTIVERSION
static void scores_small(int64_t m, int64_t n, int64_t k, const float* __restrict a, int64_t lda,
                         const float* __restrict b, int64_t ldb, float* __restrict s, int64_t lds) {
  for (int64_t j = 0; j < n; ++j) {
    const float* b_row = b + j * ldb;
    for (int64_t i = 0; i < m; ++i) {
      const float* a_row = a + i * lda;
      float lanes[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= k; d += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a_row[d + l] * b_row[d + l];
      float acc = 0.0f;
      for (; d < k; ++d) acc += a_row[d] * b_row[d];
      for (int64_t l = 0; l < kLanes; ++l) acc += lanes[l];
      s[i * lds + j] = acc;
    }
  }
}
static void scores_small(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                         int64_t ldb, double* s, int64_t lds) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) s[i * lds + j] = dot(a + i * lda, b + j * ldb, k);
}

// c [m, k] += p [m, n] @ b [n, k]
SOFTPROMPT_MULTIVERSION
static void accumulate_small(int64_t m, int64_t k, int64_t n, const float* __restrict p, int64_t ldp,
                             const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* c_row = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) {
      const float w = p[i * ldp + j];
      const float* b_row = b + j * ldb;
      for (int64_t d = 0; d < k; ++d) c_row[d] += w * b_row[d];
    }
  }
}
static void accumulate_small(int64_t m, int64_t k, int64_t n, const double* p, int64_t ldp, const double* b,
                             int64_t ldb, double* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < k; ++d) c[i * ldc + d] += p[i * ldp + j] * b[j * ldb + d];
}

}  // namespace softprompt::cpu
