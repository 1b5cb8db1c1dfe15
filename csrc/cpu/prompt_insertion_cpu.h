// Fused prompt insertion on the CPU: forward and the prompt gradient.
//
// Forward writes every output row once, straight from the prompt or from the
// embedding matrix: no intermediate embedding tensor, no prompt expanded over
// the batch. The ids must already be range-checked (the binding does it).
#pragma once

#include "../prompt_insertion/params.h"

namespace softprompt::cpu {

// Fills p.out [B, k + n, d]; scalar_t is weight's (and the cast prompt's) element type.
template <typename scalar_t>
void insert_prompt_forward(const InsertPromptParams& p);

// Fills p.grad_prompt [k, d] (float; double when scalar_t is double) with the sum over
// rows of grad_out[:, :k], each element summed in row order b = 0 .. B-1 whatever the
// thread count (deterministic, no atomics).
template <typename scalar_t>
void insert_prompt_backward(const InsertPromptGradParams& p);

}  // namespace softprompt::cpu
