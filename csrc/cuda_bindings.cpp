// The one file that turns tensors into parameters for the CUDA attention kernels (built only
// when torch has CUDA): it registers the CUDA implementation of prefix_attention_fwd, which is
// cuda_forward (csrc/cuda_forward.h: Lq <= 16 runs the split-K decode kernel, longer queries the
// tensor-core prefill kernel) on the device's SM count and the current stream. The CUDA kernels are
// forward-only (serving); prefix_attention_bwd on CUDA says so and points to the Triton backend.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "cuda_forward.h"

namespace softprompt {
namespace {

// SM count and compute capability of a device, read once (the decode plan depends on the SM
// count, never on device data).
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

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prompt_ids,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, std::optional<int64_t> window, std::optional<double> softcap,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& prefix_offsets) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaForwardTarget target = device_facts(q.device().index());
  target.device_type = at::kCUDA;
  target.stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  auto [out, lse, err] = cuda_forward(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask,
                                      causal, scale, window, softcap, sinks, prefix_offsets, target);
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return {out, lse};
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cuda(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, bool, double, bool, bool, std::optional<int64_t>, std::optional<double>,
    const std::optional<at::Tensor>&) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "the cuda backend of prefix_attention is forward-only (serving and "
                              "prefill); train with backend='triton' (or 'auto', which picks it "
                              "when gradients are needed)");
}

}  // namespace
}  // namespace softprompt

TORCH_LIBRARY_IMPL(softprompt_kernels, CUDA, m) {
  m.impl("prefix_attention_fwd", &softprompt::prefix_attention_fwd_cuda);
  m.impl("prefix_attention_bwd", &softprompt::prefix_attention_bwd_cuda);
}
