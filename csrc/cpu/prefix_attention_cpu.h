// Fused prefix attention on the CPU: forward and backward.
//
// No expand, no concatenation: each (row, kv head, query block) streams the
// valid prefix slots of its row's prompt, then its visible sequence keys, with
// an online softmax in the accumulation type (float for float/bf16/half,
// double for double). All q heads that share a kv head are processed together
// (GQA without repeating K/V).
#pragma once

#include "../prefix_attention/params.h"

namespace softprompt::cpu {

// Fills p.out and p.lse.
template <typename scalar_t>
void prefix_attention_forward(const PrefixAttentionParams& p);

// Fills every gradient of p. Prefix gradients are summed over the rows that use
// each prompt in a fixed row order (deterministic, no atomics).
template <typename scalar_t>
void prefix_attention_backward(const PrefixAttentionGradParams& p);

}  // namespace softprompt::cpu
