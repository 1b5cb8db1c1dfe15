// Host entry points of the CUDA prompt-insertion kernels (prompt_insertion.cu).
//
// Deliberately free of CUDA and torch includes: prompt_insertion_bindings.cpp
// includes it to launch the kernels, the SIMT-emulation test driver to run them
// on a CPU. cudaStream_t is forward-declared exactly as cuda_runtime declares it.
#pragma once

#include "prompt_insertion/params.h"

typedef struct CUstream_st* cudaStream_t;

namespace softprompt::cuda {

// Element type of weight / prompt / out / grad_out.
enum InsertPromptDtype : int {
  kInsertPromptFloat32 = 0,
  kInsertPromptBFloat16 = 1,
  kInsertPromptFloat16 = 2,
};

// Fills p.out [B, k + n, d]. Ids outside [0, V) never read out of bounds: their rows
// become NaN. Launches nothing when the output is empty. Returns false (and launches
// nothing) for an unknown dtype_code.
bool launch_insert_prompt_fwd(const InsertPromptParams& p, int dtype_code, cudaStream_t stream);

// Fills p.grad_prompt [k, d] (float32) with the sum over rows of grad_out[:, :k], in a
// fixed order (deterministic, no atomics); zeros when B == 0. Returns false for an
// unknown dtype_code.
bool launch_insert_prompt_bwd(const InsertPromptGradParams& p, int dtype_code, cudaStream_t stream);

}  // namespace softprompt::cuda
