// The kernels of softprompt_kernels::prefix_attention_fwd / prefix_attention_bwd, registered per dispatch key.
//
// The schemas are defined from Python (softprompt_kernels/ops/prefix_attention/contract.py); fake kernels and
// autograd are registered there too. Each kernel here is boxed: it reads its arguments by name (op_args.h), turns
// them into kernel parameters in one place (prepare.h) and runs the CPU kernels (csrc/cpu) or, in a build with
// CUDA, the CUDA forward (cuda_forward.h: split-K decode for Lq <= 16, tensor-core prefill above). The CUDA
// kernels are forward-only (serving); the CUDA backward says so and points to the Triton backend.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/prefix_attention_cpu.h"
#include "op_args.h"
#include "prefix_attention/prepare.h"

#ifdef SOFTPROMPT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <mutex>

#include "prefix_attention/cuda_forward.h"
#endif

namespace softprompt {
namespace {

template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, name, ": unsupported dtype ", dtype);
  }
}

void forward_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  const PreparedInputs in = prepare_inputs(args, at::kCPU);
  check_index_values_on_host(in);
  auto [out, lse] = allocate_forward_outputs(in);
  PrefixAttentionParams params = make_params(in);
  set_forward_outputs(params, out, lse);
  dispatch_float_types(in.q.scalar_type(), "q", [&](auto tag) {
    cpu::prefix_attention_forward<decltype(tag)>(params);
  });
  args.set_outputs(std::move(out), std::move(lse));
}

// Sinks need nothing here: lse (which includes them) and out already carry their effect.
void backward_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  const PreparedInputs in = prepare_inputs(args, at::kCPU);
  check_index_values_on_host(in);
  const PreparedGradInputs gin = prepare_grad_inputs(in, args);
  GradOutputs grads = allocate_grad_outputs(in, args.flag("seq_grads"), args.flag("prefix_grads"));
  const PrefixAttentionGradParams params = make_grad_params(in, gin, grads);
  dispatch_float_types(in.q.scalar_type(), "q", [&](auto tag) {
    cpu::prefix_attention_backward<decltype(tag)>(params);
  });
  args.set_outputs(std::move(grads.q), std::move(grads.k), std::move(grads.v), std::move(grads.prefix_k),
                   std::move(grads.prefix_v));
}

#ifdef SOFTPROMPT_WITH_CUDA
// SM count and compute capability of a device, read once (the decode plan depends on the SM count, never on
// device data).
const CudaForwardTarget& device_facts(c10::DeviceIndex device) {
  static std::array<CudaForwardTarget, 64> facts{};
  static std::mutex mutex;
  TORCH_CHECK(device >= 0 && device < int(facts.size()), "device index ", int(device), " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  CudaForwardTarget& f = facts[device];
  if (f.major == 0) {
    CudaForwardTarget read;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&read.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&read.minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&read.sms, cudaDevAttrMultiProcessorCount, device));
    f = read;
  }
  return f;
}

void forward_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  const at::Device device = args.tensor("q").device();
  const c10::cuda::CUDAGuard guard(device);
  CudaForwardTarget target = device_facts(device.index());
  target.device_type = at::kCUDA;
  target.stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  auto [out, lse, err] = cuda_forward(args, target);
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  args.set_outputs(std::move(out), std::move(lse));
}

void backward_cuda(const c10::OperatorHandle&, torch::jit::Stack*) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "the cuda backend of prefix_attention is forward-only (serving and prefill); train "
                              "with backend='triton' (or 'auto', which picks it when gradients are needed)");
}
#endif

}  // namespace
}  // namespace softprompt

TORCH_LIBRARY_IMPL(softprompt_kernels, CPU, m) {
  m.impl("prefix_attention_fwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::forward_cpu>());
  m.impl("prefix_attention_bwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::backward_cpu>());
}

#ifdef SOFTPROMPT_WITH_CUDA
TORCH_LIBRARY_IMPL(softprompt_kernels, CUDA, m) {
  m.impl("prefix_attention_fwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::forward_cuda>());
  m.impl("prefix_attention_bwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::backward_cuda>());
}
#endif
