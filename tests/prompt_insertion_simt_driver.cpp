// C entry points that run the CUDA prompt-insertion kernels under the SIMT emulator
// (tests/cuda_emulation/simt_emulation.h), for tests/test_prompt_insertion_simt.py.
// Built with a host compiler and -DSOFTPROMPT_SIMT_EMULATION, together with
// csrc/cuda/prompt_insertion.cu compiled as C++. Pointers are torch tensors' data.
#include <cstdint>

#include "cuda/prompt_insertion_kernels.cuh"
#include "cuda/prompt_insertion_launch.h"

namespace {

template <typename Launch>
int run_typed(int dtype_code, Launch&& launch) {
  using namespace softprompt::cuda;
  switch (dtype_code) {
    case kInsertPromptFloat32: launch(float{}); return 1;
    case kInsertPromptBFloat16: launch(__nv_bfloat16{}); return 1;
    case kInsertPromptFloat16: launch(__half{}); return 1;
    default: return 0;
  }
}

}  // namespace

// max_blocks <= 0: the public launcher (dtype dispatch included); else the grid is capped
// at max_blocks so that the grid-stride loops run.
extern "C" int simt_insert_prompt_fwd(const int64_t* ids, int64_t ids_stride_b, int64_t ids_stride_t,
                                      const void* weight, int64_t weight_stride_v, int64_t vocab,
                                      const void* prompt, int64_t prompt_stride_k, void* out, int64_t batch,
                                      int64_t prompt_len, int64_t num_ids, int64_t dim, int dtype_code,
                                      int64_t max_blocks) {
  softprompt::InsertPromptParams p{ids,   ids_stride_b, ids_stride_t, weight, weight_stride_v, prompt,
                                   prompt_stride_k, out, batch, prompt_len, num_ids, dim, vocab};
  if (max_blocks <= 0) return softprompt::cuda::launch_insert_prompt_fwd(p, dtype_code, nullptr) ? 1 : 0;
  return run_typed(dtype_code, [&](auto tag) {
    softprompt::cuda::insertion::launch_fwd<decltype(tag)>(p, nullptr, max_blocks);
  });
}

extern "C" int simt_insert_prompt_bwd(const void* grad_out, int64_t stride_b, int64_t stride_t, int64_t stride_d,
                                      void* grad_prompt, int64_t batch, int64_t prompt_len, int64_t dim,
                                      int dtype_code, int64_t max_blocks) {
  softprompt::InsertPromptGradParams p{grad_out, stride_b, stride_t, stride_d, grad_prompt, batch, prompt_len, dim};
  if (max_blocks <= 0) return softprompt::cuda::launch_insert_prompt_bwd(p, dtype_code, nullptr) ? 1 : 0;
  return run_typed(dtype_code, [&](auto tag) {
    softprompt::cuda::insertion::launch_bwd<decltype(tag)>(p, nullptr, max_blocks);
  });
}

// Whether launch_fwd would take the 16-byte path for these pointers and strides.
extern "C" int simt_insert_prompt_vectorized(const void* weight, int64_t weight_stride_v, const void* prompt,
                                             int64_t prompt_stride_k, void* out, int64_t batch, int64_t prompt_len,
                                             int64_t num_ids, int64_t dim, int dtype_code) {
  softprompt::InsertPromptParams p{nullptr, 0, 0, weight, weight_stride_v, prompt, prompt_stride_k,
                                   out, batch, prompt_len, num_ids, dim, 0};
  int vec = 0;
  run_typed(dtype_code, [&](auto tag) { vec = softprompt::cuda::insertion::can_copy_16_bytes<decltype(tag)>(p); });
  return vec;
}
