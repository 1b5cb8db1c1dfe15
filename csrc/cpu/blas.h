// Row-major GEMM for the CPU kernels: C = alpha * op(A) @ op(B) + beta * C.
//
// The small block products of the fused kernel go to the BLAS that libtorch
// already carries (MKL's Fortran `sgemm_`/`dgemm_` on x86 builds), reached as
// weak symbols so that an install whose torch lacks them still loads and runs
// on the portable loop below. A one-time self-check guards against a BLAS with
// another integer width (ILP64), which would otherwise give silent garbage.
#pragma once

#include <cstdint>
#include <mutex>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace softprompt::cpu {

// Portable fallback, row-major. Used when no BLAS symbol is present.
template <typename T>
void gemm_loops(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c_row = c + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) c_row[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) c_row[j] *= beta;
    }
    for (int64_t p = 0; p < k; ++p) {
      const T a_ip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b[j * ldb + p];
      } else {
        const T* b_row = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
      }
    }
  }
}

template <typename T>
struct FortranGemm;
template <>
struct FortranGemm<float> {
  static bool present() { return sgemm_ != nullptr; }
  static void call(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                   const float* al, const float* a, const int* lda, const float* b, const int* ldb,
                   const float* be, float* c, const int* ldc) {
    sgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
  }
};
template <>
struct FortranGemm<double> {
  static bool present() { return dgemm_ != nullptr; }
  static void call(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                   const double* al, const double* a, const int* lda, const double* b,
                   const int* ldb, const double* be, double* c, const int* ldc) {
    dgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
  }
};

// Row-major product through column-major BLAS: C^T = op(B)^T @ op(A)^T.
template <typename T>
void gemm_blas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  FortranGemm<T>::call(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// True when the BLAS symbol exists and agrees with the loop on a small product.
template <typename T>
bool blas_usable() {
  static bool usable = [] {
    if (!FortranGemm<T>::present()) return false;
    // A [3, 2] (lda 2), B^T given as [4, 2] (ldb 2): C [3, 4].
    const T a[6] = {1, 2, 3, 4, 5, 6};
    const T b[8] = {1, 0, 0, 1, 1, 1, 2, -1};
    T c_blas[12], c_ref[12];
    for (int i = 0; i < 12; ++i) c_blas[i] = c_ref[i] = T(0.5);
    gemm_blas<T>(false, true, 3, 4, 2, T(2), a, 2, b, 2, T(1), c_blas, 4);
    gemm_loops<T>(false, true, 3, 4, 2, T(2), a, 2, b, 2, T(1), c_ref, 4);
    for (int i = 0; i < 12; ++i)
      if (c_blas[i] != c_ref[i]) return false;
    return true;
  }();
  return usable;
}

template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // BLAS leaves C untouched for k == 0 only when beta == 1
    gemm_loops<T>(trans_a, trans_b, m, n, 0, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (blas_usable<T>()) {
    gemm_blas<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    gemm_loops<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

}  // namespace softprompt::cpu
