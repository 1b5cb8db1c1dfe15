// The CUDA forward compiled for the host with the SIMT emulator, as an op on CPU tensors (tests only:
// tests/cuda_emulation/__init__.py builds this with torch's cpp_extension and defines the op's schema: the
// contract's arguments of prefix_attention_fwd plus num_splits and num_sms).
// `softprompt_emulation::cuda_forward` runs the real dispatch code of the CUDA kernel
// (csrc/prefix_attention/cuda_forward.h) and the real launch dispatch (csrc/cuda/*_dispatch.cu, plain C++
// under the emulator), on CPU tensors.
#include <torch/extension.h>
#include <torch/library.h>

#include "cuda/decode_kernel.cuh"
#include "cuda/prefill_kernel.cuh"
#include "cuda/decode_dispatch.cu"
#include "cuda/prefill_dispatch.cu"
#include "prefix_attention/cuda_forward.h"

namespace {

namespace sc = softprompt::cuda;

// The CUDA kernel's forward on an emulated sm_90 part with `num_sms` SMs; num_splits > 0 forces the decode
// plan's split count.
void cuda_forward(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const softprompt::OpArgs args(op, stack);
  softprompt::CudaForwardTarget target;
  target.device_type = at::kCPU;
  target.sms = int(args.integer("num_sms"));
  target.major = 9;
  target.forced_splits = int(args.integer("num_splits"));
  auto [out, lse, err] = softprompt::cuda_forward(args, target);
  TORCH_CHECK(err == 0, "emulated launch failed with error ", err);
  args.set_outputs(std::move(out), std::move(lse));
}

std::vector<int64_t> decode_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t K,
                                 int64_t num_sms) {
  softprompt::PrefixAttentionParams p{};
  p.batch = B, p.heads_q = Hq, p.heads_kv = Hkv, p.len_q = Lq, p.len_k = Lk, p.prefix_slots = K;
  const sc::DecodePlan plan = sc::plan_decode(p, int(num_sms));
  return {plan.num_splits, plan.keys_per_split, plan.query_block, plan.query_tiles};
}

}  // namespace

TORCH_LIBRARY_IMPL(softprompt_emulation, CPU, m) {
  m.impl("cuda_forward", torch::CppFunction::makeFromBoxedFunction<&cuda_forward>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_plan", &decode_plan);
  m.def("decode_max_queries", [] { return int64_t(sc::kDecodeMaxQueries); });
}
