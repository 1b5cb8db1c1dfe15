// C entry points for tests/test_row_math.py: the softmax passes of csrc/cpu/row_math.h, compiled by the
// test for one instruction set (-march) at a time, each pass in its vector form (vec = 1) or its
// portable scalar form (vec = 0), so that the two can be compared on the same inputs.
#include "cpu/row_math.h"

using namespace softprompt::cpu;

extern "C" {

int row_math_has_vectors() { return SOFTPROMPT_VECTOR_MATH + 0; }

// One forward online-softmax step over a chunk s [rows, width] (in place), m, l [rows], o [rows, D].
void row_math_online_softmax(float* s, int64_t rows, int64_t width, float* m, float* l, float* o, int64_t D,
                             int vec) {
#if SOFTPROMPT_VECTOR_MATH
  if (vec) return online_softmax_chunk_vec(s, rows, width, m, l, o, D);
#endif
  online_softmax_chunk_body(s, rows, width, m, l, o, D);
}

// The backward pass over a chunk: s becomes P, dp becomes dS.
void row_math_softmax_grad(float* s, float* dp, int64_t rows, int64_t width, const float* lse,
                           const float* delta, int vec) {
#if SOFTPROMPT_VECTOR_MATH
  if (vec) return softmax_grad_chunk_vec(s, dp, rows, width, lse, delta);
#endif
  softmax_grad_chunk_body(s, dp, rows, width, lse, delta);
}

// y = exp_approx(x) for n values (n a multiple of kVec when vec = 1).
void row_math_exp(const float* x, float* y, int64_t n, int vec) {
#if SOFTPROMPT_VECTOR_MATH
  if (vec) {
    for (int64_t i = 0; i < n; i += kVec) store_vec(y + i, exp_approx(load_vec(x + i)));
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = exp_approx(x[i]);
}
}
