// Row operations of the online softmax, in the accumulation type.
//
// Compiled for AVX-512, AVX2+FMA and baseline x86-64 (GCC picks one at load
// time through target_clones), so the exponentials vectorise on any machine
// without building the whole extension for one instruction set. The float
// exponential is a Cody-Waite reduction plus a degree-6 polynomial: relative
// error below 1e-7 on [-87, 88]; masked scores (-inf) map to exactly 0.
#pragma once

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

namespace softprompt::cpu {

inline float exp_approx(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}
// Reductions keep 16 independent lanes so that they vectorise without
// -ffast-math (a single float accumulator is a serial dependency chain).
constexpr int64_t kLanes = 16;

SOFTPROMPT_MULTIVERSION
static float row_max(const float* __restrict s, int64_t n) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = s[j + l] > lanes[l] ? s[j + l] : lanes[l];
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  for (int64_t l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}
static double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

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

// s[j] <- exp(s[j] - shift); returns the sum. shift must be finite.
SOFTPROMPT_MULTIVERSION
static float exp_shift_sum(float* __restrict s, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float e = exp_approx(s[j + l] - shift);
      s[j + l] = e;
      lanes[l] += e;
    }
  float sum = 0.0f;
  for (; j < n; ++j) {
    s[j] = exp_approx(s[j] - shift);
    sum += s[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}
static double exp_shift_sum(double* s, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// Backward: p = exp(s - lse) in place, then ds = p * (dp - delta) in dp.
SOFTPROMPT_MULTIVERSION
static void softmax_grad_row(float* __restrict s, float* __restrict dp, int64_t n, float lse,
                             float delta) {
  for (int64_t j = 0; j < n; ++j) {
    const float p = exp_approx(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
}
static void softmax_grad_row(double* s, double* dp, int64_t n, double lse, double delta) {
  for (int64_t j = 0; j < n; ++j) {
    const double p = std::exp(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
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

template <typename T>
inline void scale_row(T* __restrict x, int64_t n, T factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

}  // namespace softprompt::cpu
