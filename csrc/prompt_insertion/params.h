// Plain parameter structs of the fused prompt-insertion kernels (CPU and CUDA).
//
// No torch headers here: the CUDA kernels include this file and are compiled
// without torch. prompt_insertion_bindings.cpp fills these structs from
// validated tensors. Strides are in elements; the last dimension of every
// float tensor has stride 1 except grad_out, which may have any strides (the
// gradient of a broadcast sum arrives with stride 0).
//
// Shapes:
//   input_ids   [B, n]        int64, any strides, values in [0, V) (checked by the caller)
//   weight      [V, d]        the frozen embedding matrix, row stride weight_stride_v
//   prompt      [k, d]        the soft prompt, already in weight's dtype, row stride prompt_stride_k
//   out         [B, k + n, d] contiguous, weight's dtype: out[b, :k] = prompt, out[b, k + t] = weight[ids[b, t]]
//   grad_out    [B, >= k, d]  any strides; only its first k rows per sequence are read
//   grad_prompt [k, d]        contiguous, accumulation dtype (float; double for double):
//                             grad_prompt[i, j] = sum over b (in order b = 0 .. B-1) of grad_out[b, i, j]
#pragma once

#include <cstdint>

namespace softprompt {

struct InsertPromptParams {
  const int64_t* input_ids;  // [B, n]
  int64_t ids_stride_b, ids_stride_t;
  const void* weight;  // [V, d]
  int64_t weight_stride_v;
  const void* prompt;  // [k, d]
  int64_t prompt_stride_k;
  void* out;  // [B, k + n, d], contiguous

  int64_t batch;       // B
  int64_t prompt_len;  // k
  int64_t num_ids;     // n
  int64_t dim;         // d
  int64_t vocab;       // V
};

struct InsertPromptGradParams {
  const void* grad_out;  // [B, >= k, d]
  int64_t grad_stride_b, grad_stride_t, grad_stride_d;
  void* grad_prompt;  // [k, d], contiguous, accumulation dtype

  int64_t batch;       // B
  int64_t prompt_len;  // k
  int64_t dim;         // d
};

}  // namespace softprompt
