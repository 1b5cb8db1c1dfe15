// Plain parameter structs shared by every prefix-attention kernel (CPU and CUDA).
//
// No torch headers here: the CUDA kernels include this file and are compiled
// without torch (see docs/DESIGN.md section 5). The one file that touches torch
// (bindings.cpp) fills these structs from tensors after validating them.
//
// Shapes (strides are in elements; the last dimension is always contiguous):
//   q           [B, Hq,  Lq, D]
//   k, v        [B, Hkv, Lk, D]     Hq % Hkv == 0, Lq <= Lk
//   prefix_k/v  [P, Hkv, K,  D]     a bank of P prefixes, K may be 0
//   prompt_ids  [B]   int64 in [-1, P), or null: every row uses prompt 0
//   prefix_lens [P]   int64 in [0, K],  or null: every prompt uses all K slots
//   key_padding_mask [B, Lk] bool (true = real token), or null: no padding
//   sinks       [Hq]  accumulation dtype, or null: one extra softmax logit per q head (no value)
//   prefix_offsets [B] int64, or null: with a window, row b's prefix sits right before its key prefix_offsets[b]
//   out         [B, Hq, Lq, D]      same dtype as q
//   lse         [B, Hq, Lq]         accumulation dtype, natural log, -inf when nothing is visible
#pragma once

#include <cstdint>

namespace softprompt {

struct Strides4 {
  int64_t b, h, l;  // the last dimension has stride 1
};

struct PrefixAttentionParams {
  // Inputs (element type given by the dispatching code).
  const void* q;         // [B, Hq, Lq, D]
  const void* k;         // [B, Hkv, Lk, D]
  const void* v;         // [B, Hkv, Lk, D]
  const void* prefix_k;  // [P, Hkv, K, D]
  const void* prefix_v;  // [P, Hkv, K, D]
  const int64_t* prompt_ids;      // [B] or nullptr
  const int64_t* prefix_lens;     // [P] or nullptr
  const bool* key_padding_mask;   // [B, Lk] or nullptr
  int64_t mask_stride_b, mask_stride_l;

  Strides4 q_strides, k_strides, v_strides, pk_strides, pv_strides;

  // Outputs of the forward pass.
  void* out;  // [B, Hq, Lq, D]
  void* lse;  // [B, Hq, Lq], contiguous, accumulation dtype
  Strides4 out_strides;

  int64_t batch, heads_q, heads_kv, len_q, len_k, num_prompts, prefix_slots, head_dim;
  bool causal;
  double scale;
  // Modern-attention features (docs/DESIGN.md section 2); 0 / null when off.
  int64_t window;       // sliding window: key visible iff index(query) - index(key) < window
  double softcap;       // score <- softcap * tanh(score / softcap), after scaling
  const void* sinks;    // [Hq], accumulation dtype: one extra logit per q head in the softmax normaliser
  const int64_t* prefix_offsets;  // [B] or nullptr (zeros): shifts the window index of the row's prefix

  // Index of query i among the keys (bottom-right aligned); sequence key j has index j and prefix
  // slot s of a prompt with n valid slots index s - n (the prefix right before the text).
  inline int64_t query_index(int64_t i) const { return i + (len_k - len_q); }
  // Window index of prefix slot s of row b, whose prompt has n valid slots.
  inline int64_t prefix_index(int64_t b, int64_t s, int64_t n) const {
    return s - n + (prefix_offsets ? prefix_offsets[b] : 0);
  }
  // The smallest key index query i may see through the window (no bound without one).
  inline int64_t window_first_index(int64_t i) const {
    return window > 0 ? query_index(i) - window + 1 : INT64_MIN / 2;
  }

  // Prefix length of prompt `p` (all slots when no lengths are given).
  inline int64_t prefix_len(int64_t p) const {
    return prefix_lens ? prefix_lens[p] : prefix_slots;
  }
  // Prompt of row `b`: -1 means no prefix.
  inline int64_t prompt_of_row(int64_t b) const {
    if (num_prompts == 0 || prefix_slots == 0) return -1;
    return prompt_ids ? prompt_ids[b] : 0;
  }
  // Sequence keys j < causal_key_end(i) may be seen by query i (bottom-right aligned).
  inline int64_t causal_key_end(int64_t i) const {
    if (!causal) return len_k;
    const int64_t end = i + (len_k - len_q) + 1;
    return end < len_k ? end : len_k;
  }
  inline bool key_is_real(int64_t b, int64_t j) const {
    return key_padding_mask == nullptr || key_padding_mask[b * mask_stride_b + j * mask_stride_l];
  }
};

struct PrefixAttentionGradParams : PrefixAttentionParams {
  const void* grad_out;  // [B, Hq, Lq, D]
  Strides4 grad_out_strides;
  const void* grad_lse;  // [B, Hq, Lq] contiguous, accumulation dtype, or nullptr

  // Which gradients are wanted (autograd's needs_input_grad): seq_grads = those of q, k and v;
  // prefix_grads = those of prefix_k and prefix_v. The kernels skip the work of the others (with
  // frozen first layers, q, k and v need none: only the prefix does) and leave their pointers null.
  bool seq_grads;
  bool prefix_grads;

  // Gradients, written in full (zeros where no gradient flows).
  void* grad_q;          // [B, Hq, Lq, D]
  void* grad_k;          // [B, Hkv, Lk, D]
  void* grad_v;          // [B, Hkv, Lk, D]
  void* grad_prefix_k;   // [P, Hkv, K, D], summed over the rows that use each prompt
  void* grad_prefix_v;   // [P, Hkv, K, D]
  Strides4 grad_q_strides, grad_k_strides, grad_v_strides, grad_pk_strides, grad_pv_strides;

  // Scratch for the CPU backward: per-(row, kv head) prefix gradients [B, Hkv, K, D] in the
  // accumulation dtype, summed per prompt afterwards. Null when there is no prefix.
  void* prefix_partial_k;
  void* prefix_partial_v;
};

}  // namespace softprompt
