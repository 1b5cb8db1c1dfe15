// The one file that turns tensors into kernel parameters for the CPU kernels:
// op schemas (TORCH_LIBRARY), argument checks, allocation, dtype dispatch and
// the CPU implementations. Fake kernels and autograd are registered from
// Python (softprompt_kernels/_ops.py). CUDA implementations register
// themselves from cuda_bindings.cpp, built only when torch has CUDA.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/blas.h"
#include "cpu/prefix_attention_cpu.h"
#include "prefix_attention_checks.h"

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

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prompt_ids,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, std::optional<int64_t> window, std::optional<double> softcap,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& prefix_offsets) {
  PreparedInputs in = prepare_inputs(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask,
                                     causal, scale, at::kCPU, window, softcap, sinks, prefix_offsets);
  check_index_values_on_host(in);
  auto [out, lse] = allocate_forward_outputs(in);
  PrefixAttentionParams params = make_params(in);
  set_forward_outputs(params, out, lse);
  dispatch_float_types(q.scalar_type(), "q", [&](auto tag) {
    cpu::prefix_attention_forward<decltype(tag)>(params);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prompt_ids,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, bool seq_grads,
    bool prefix_grads, std::optional<int64_t> window, std::optional<double> softcap,
    const std::optional<at::Tensor>& prefix_offsets) {
  // Sinks need nothing here: lse (which includes them) and out already carry their effect.
  PreparedInputs in = prepare_inputs(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask,
                                     causal, scale, at::kCPU, window, softcap, std::nullopt, prefix_offsets);
  check_index_values_on_host(in);
  PreparedGradInputs gin = prepare_grad_inputs(in, grad_out, grad_lse, out, lse);
  GradOutputs grads = allocate_grad_outputs(in, seq_grads, prefix_grads);
  PrefixAttentionGradParams params = make_grad_params(in, gin, grads);
  dispatch_float_types(q.scalar_type(), "q", [&](auto tag) {
    cpu::prefix_attention_backward<decltype(tag)>(params);
  });
  return {grads.q, grads.k, grads.v, grads.prefix_k, grads.prefix_v};
}

}  // namespace
}  // namespace softprompt

TORCH_LIBRARY(softprompt_kernels, m) {
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prompt_ids, Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, "
      "float scale, int? window=None, float? softcap=None, Tensor? sinks=None, Tensor? prefix_offsets=None) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "prefix_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor prefix_k, Tensor prefix_v, Tensor? prompt_ids, Tensor? prefix_lens, "
      "Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float scale, "
      "bool seq_grads=True, bool prefix_grads=True, int? window=None, float? softcap=None, "
      "Tensor? prefix_offsets=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_prefix_k, Tensor grad_prefix_v)");
}

TORCH_LIBRARY_IMPL(softprompt_kernels, CPU, m) {
  m.impl("prefix_attention_fwd", &softprompt::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &softprompt::prefix_attention_bwd_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "softprompt_kernels C++ extension: registers the softprompt_kernels:: ops.";
  m.def("blas_in_use", []() { return softprompt::cpu::blas_usable<float>(); },
        "True when the CPU kernel's block products run on torch's BLAS (else portable loops).");
#ifdef SOFTPROMPT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
