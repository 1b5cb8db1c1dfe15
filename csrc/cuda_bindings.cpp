// The one file that turns tensors into parameters for the CUDA attention kernels (built only
// when torch has CUDA). prefix_attention_fwd gets a CUDA implementation: Lq <= 16 runs the
// split-K decode kernel, longer queries the tensor-core prefill kernel. The CUDA kernels are
// forward-only (serving); prefix_attention_bwd on CUDA says so and points to the Triton backend.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <mutex>

#include "cuda/decode_launch.h"
#include "cuda/prefill_launch.h"
#include "prefix_attention_checks.h"

namespace softprompt {
namespace {

// The kernels read rows with 16-byte loads: base pointer and every stride must allow them.
bool allows_vector_loads(const at::Tensor& t) {
  if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

at::Tensor for_vector_loads(const at::Tensor& t) {
  return allows_vector_loads(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

struct DeviceFacts {
  int sms = 0, major = 0, minor = 0;
};

// SM count and compute capability of a device, read once (the decode plan depends on the SM
// count, never on device data).
const DeviceFacts& device_facts(c10::DeviceIndex device) {
  static std::array<DeviceFacts, 64> facts{};
  static std::mutex mutex;
  TORCH_CHECK(device >= 0 && device < int(facts.size()), "device index ", int(device), " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  DeviceFacts& f = facts[device];
  if (f.sms == 0) {
    DeviceFacts read;
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
    bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  PreparedInputs in = prepare_inputs(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                                     key_padding_mask, causal, scale, at::kCUDA);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf,
                   "the cuda backend takes bfloat16 or float16 q, got ", dtype,
                   " (backend='triton' or 'torch' take float32)");
  TORCH_CHECK_VALUE(cuda::decode_supports_head_dim(in.D) && cuda::prefill_supports_head_dim(in.D),
                    "the cuda backend supports head dims 64, 128 and 256, got ", in.D,
                    " (backend='triton' serves other head dims)");
  const DeviceFacts& facts = device_facts(q.device().index());
  TORCH_CHECK_VALUE(facts.major >= 8, "the cuda backend needs compute capability 8.0 or newer, got ",
                    facts.major, ".", facts.minor);
  in.q = for_vector_loads(in.q);
  in.k = for_vector_loads(in.k);
  in.v = for_vector_loads(in.v);
  in.prefix_k = for_vector_loads(in.prefix_k);
  in.prefix_v = for_vector_loads(in.prefix_v);
  auto [out, lse] = allocate_forward_outputs(in);
  if (out.numel() == 0) return {out, lse};

  PrefixAttentionParams params = make_params(in);
  set_forward_outputs(params, out, lse);
  const auto half = dtype == at::kBFloat16 ? cuda::HalfType::kBFloat16 : cuda::HalfType::kFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  int err = 0;
  if (in.Lq <= cuda::kDecodeMaxQueries) {
    cuda::DecodeParams decode{};
    decode.attn = params;
        const cuda::DecodePlan plan = cuda::plan_decode(params, facts.sms);
    decode.num_splits = plan.num_splits;
    decode.keys_per_split = plan.keys_per_split;
    decode.query_block = plan.query_block;
    decode.query_tiles = plan.query_tiles;
    at::Tensor partial_out, partial_lse;  // from the caching allocator: no cudaMalloc, graph-capturable
    if (plan.num_splits > 1) {
      const auto f32 = q.options().dtype(at::kFloat);
      partial_out = at::empty({plan.num_splits, in.B, in.Hq, in.Lq, in.D}, f32);
      partial_lse = at::empty({plan.num_splits, in.B, in.Hq, in.Lq}, f32);
      decode.partial_out = partial_out.data_ptr<float>();
      decode.partial_lse = partial_lse.data_ptr<float>();
    }
    err = cuda::launch_prefix_decode(decode, half, stream);
  } else {
    err = cuda::launch_prefix_prefill(params, half, stream);
  }
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cuda(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, bool, double, bool, bool) {
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
