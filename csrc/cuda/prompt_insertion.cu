// Launchers of the fused prompt-insertion kernels: dtype code -> kernel instantiation.
// The kernels and their launch configuration live in prompt_insertion_kernels.cuh.
#include "cuda/prompt_insertion_kernels.cuh"
#include "cuda/prompt_insertion_launch.h"

namespace softprompt {
namespace cuda {

namespace {
// dtype code -> run(element type{}); false for a code without kernels.
template <typename Run>
bool with_element_type(int dtype_code, Run&& run) {
  switch (dtype_code) {
    case kInsertPromptFloat32: run(float{}); return true;
    case kInsertPromptBFloat16: run(__nv_bfloat16{}); return true;
    case kInsertPromptFloat16: run(__half{}); return true;
    default: return false;
  }
}
}  // namespace

bool launch_insert_prompt_fwd(const InsertPromptParams& p, int dtype_code, cudaStream_t stream) {
  return with_element_type(dtype_code, [&](auto type) { insertion::launch_fwd<decltype(type)>(p, stream); });
}

bool launch_insert_prompt_bwd(const InsertPromptGradParams& p, int dtype_code, cudaStream_t stream) {
  return with_element_type(dtype_code, [&](auto type) { insertion::launch_bwd<decltype(type)>(p, stream); });
}

}  // namespace cuda
}  // namespace softprompt
