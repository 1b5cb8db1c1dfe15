// The CUDA kernels, compiled for the host with the SIMT emulator, as functions on CPU tensors
// (tests only: tests/cuda_emulation/__init__.py builds this with torch's cpp_extension).
// Arguments are prepared by the same code as the real CUDA binding (prefix_attention_checks.h).
#include <torch/extension.h>

#include "cuda/decode_kernel.cuh"
#include "cuda/prefill_kernel.cuh"
#include "prefix_attention_checks.h"

namespace {

using softprompt::PreparedInputs;
namespace sc = softprompt::cuda;

template <typename Fn>
void dispatch_half(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kBFloat16) fn(__nv_bfloat16{});
  else if (dtype == at::kHalf) fn(__half{});
  else TORCH_CHECK(false, "emulated kernels take bfloat16 or float16, got ", dtype);
}

std::tuple<at::Tensor, at::Tensor> decode_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prompt_ids,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, int64_t num_splits, int64_t num_sms) {
  PreparedInputs in = softprompt::prepare_inputs(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                                                 key_padding_mask, causal, scale, at::kCPU);
  auto [out, lse] = softprompt::allocate_forward_outputs(in);
  sc::DecodeParams params{};
  params.attn = softprompt::make_params(in);
  softprompt::set_forward_outputs(params.attn, out, lse);
  const sc::DecodePlan plan = num_splits > 0 ? sc::plan_decode_with_splits(params.attn, int(num_splits))
                                             : sc::plan_decode(params.attn, int(num_sms));
  params.num_splits = plan.num_splits;
  params.keys_per_split = plan.keys_per_split;
  params.query_block = plan.query_block;
  params.query_tiles = plan.query_tiles;
  at::Tensor partial_out, partial_lse;
  if (plan.num_splits > 1) {
    partial_out = at::empty({plan.num_splits, in.B, in.Hq, in.Lq, in.D}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({plan.num_splits, in.B, in.Hq, in.Lq}, q.options().dtype(at::kFloat));
    params.partial_out = partial_out.data_ptr<float>();
    params.partial_lse = partial_lse.data_ptr<float>();
  }
  dispatch_half(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    switch (in.D) {
      case 64: sc::run_prefix_decode<T, 64>(params, nullptr); break;
      case 128: sc::run_prefix_decode<T, 128>(params, nullptr); break;
      case 256: sc::run_prefix_decode<T, 256>(params, nullptr); break;
      default: TORCH_CHECK(false, "decode head dims are 64, 128, 256");
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> prefill_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prompt_ids,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale) {
  PreparedInputs in = softprompt::prepare_inputs(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                                                 key_padding_mask, causal, scale, at::kCPU);
  auto [out, lse] = softprompt::allocate_forward_outputs(in);
  softprompt::PrefixAttentionParams params = softprompt::make_params(in);
  softprompt::set_forward_outputs(params, out, lse);
  dispatch_half(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    switch (in.D) {
      case 64: sc::run_prefix_prefill<T, 64>(params, nullptr); break;
      case 128: sc::run_prefix_prefill<T, 128>(params, nullptr); break;
      case 256: sc::run_prefix_prefill<T, 256>(params, nullptr); break;
      default: TORCH_CHECK(false, "prefill head dims are 64, 128, 256");
    }
  });
  return {out, lse};
}

std::vector<int64_t> decode_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t K,
                                 int64_t num_sms) {
  softprompt::PrefixAttentionParams p{};
  p.batch = B, p.heads_q = Hq, p.heads_kv = Hkv, p.len_q = Lq, p.len_k = Lk, p.prefix_slots = K;
  const sc::DecodePlan plan = sc::plan_decode(p, int(num_sms));
  return {plan.num_splits, plan.keys_per_split, plan.query_block, plan.query_tiles};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_forward", &decode_forward);
  m.def("decode_plan", &decode_plan);
  m.def("prefill_forward", &prefill_forward);
}
