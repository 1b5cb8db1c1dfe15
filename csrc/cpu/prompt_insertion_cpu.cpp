// Fused prompt insertion on the CPU (see prompt_insertion_cpu.h).
//
// Forward: one at::parallel_for over the B * (k + n) output rows; each row is
// one memcpy from its source (a prompt row, or the embedding row of its id).
// Backward: tasks own disjoint ranges of the flattened [k, d] gradient and sum
// over b in order inside them, so the result does not depend on the thread count.
#include "prompt_insertion_cpu.h"

#include "float_types.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace softprompt::cpu {
namespace {

constexpr int64_t kGrainElements = 32768;  // elements touched per task, as at::internal::GRAIN_SIZE

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item));
}

// dst[0:len] += src[0:len * stride : stride], converted to the accumulation type.
template <typename scalar_t, typename acc_t>
inline void accumulate(acc_t* dst, const scalar_t* src, int64_t len, int64_t stride) {
  if (stride == 1) {
    for (int64_t j = 0; j < len; ++j) dst[j] += static_cast<acc_t>(src[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j] += static_cast<acc_t>(src[j * stride]);
  }
}

}  // namespace

template <typename scalar_t>
void insert_prompt_forward(const InsertPromptParams& p) {
  const int64_t k = p.prompt_len, L = p.prompt_len + p.num_ids, d = p.dim, rows = p.batch * L;
  if (rows == 0 || d == 0) return;
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(scalar_t);
  const auto* weight = static_cast<const scalar_t*>(p.weight);
  const auto* prompt = static_cast<const scalar_t*>(p.prompt);
  auto* out = static_cast<scalar_t*>(p.out);
  at::parallel_for(0, rows, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, t = r % L;
      const scalar_t* src =
          t < k ? prompt + t * p.prompt_stride_k
                : weight + p.input_ids[b * p.ids_stride_b + (t - k) * p.ids_stride_t] * p.weight_stride_v;
      std::memcpy(out + r * d, src, row_bytes);
    }
  });
}

template <typename scalar_t>
void insert_prompt_backward(const InsertPromptGradParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = p.batch, d = p.dim, total = p.prompt_len * p.dim;
  if (total == 0) return;
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out);
  auto* grad_prompt = static_cast<acc_t*>(p.grad_prompt);
  at::parallel_for(0, total, grain(B), [&](int64_t begin, int64_t end) {
    // The task's range, split at prompt-row boundaries into contiguous segments.
    for (int64_t e = begin; e < end;) {
      const int64_t i = e / d, j0 = e % d, len = std::min(d - j0, end - e);
      acc_t* dst = grad_prompt + i * d + j0;
      std::fill(dst, dst + len, acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        accumulate(dst, grad_out + b * p.grad_stride_b + i * p.grad_stride_t + j0 * p.grad_stride_d, len,
                   p.grad_stride_d);
      }
      e += len;
    }
  });
}

#define SOFTPROMPT_INSTANTIATE(T)                                        \
  template void insert_prompt_forward<T>(const InsertPromptParams&);     \
  template void insert_prompt_backward<T>(const InsertPromptGradParams&);
SOFTPROMPT_FOR_CPU_FLOAT_TYPES(SOFTPROMPT_INSTANTIATE)
#undef SOFTPROMPT_INSTANTIATE

}  // namespace softprompt::cpu
