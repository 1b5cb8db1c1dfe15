// Launchers of the fused prompt-insertion kernels: dtype code -> kernel instantiation.
// The kernels and their launch configuration live in prompt_insertion_kernels.cuh.
#include "cuda/prompt_insertion_kernels.cuh"
#include "cuda/prompt_insertion_launch.h"

namespace softprompt {
namespace cuda {

bool launch_insert_prompt_fwd(const InsertPromptParams& p, int dtype_code, cudaStream_t stream) {
  switch (dtype_code) {
    case kInsertPromptFloat32: insertion::launch_fwd<float>(p, stream); return true;
    case kInsertPromptBFloat16: insertion::launch_fwd<__nv_bfloat16>(p, stream); return true;
    case kInsertPromptFloat16: insertion::launch_fwd<__half>(p, stream); return true;
    default: return false;
  }
}

bool launch_insert_prompt_bwd(const InsertPromptGradParams& p, int dtype_code, cudaStream_t stream) {
  switch (dtype_code) {
    case kInsertPromptFloat32: insertion::launch_bwd<float>(p, stream); return true;
    case kInsertPromptBFloat16: insertion::launch_bwd<__nv_bfloat16>(p, stream); return true;
    case kInsertPromptFloat16: insertion::launch_bwd<__half>(p, stream); return true;
    default: return false;
  }
}

}  // namespace cuda
}  // namespace softprompt
