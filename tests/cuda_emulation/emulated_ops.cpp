// The CUDA forward compiled for the host with the SIMT emulator, as functions on CPU tensors
// (tests only: tests/cuda_emulation/__init__.py builds this with torch's cpp_extension).
// `forward` runs the real dispatch code of the CUDA binding (csrc/cuda_forward.h) and the real
// launch dispatch (csrc/cuda/*_dispatch.cu, plain C++ under the emulator), on CPU tensors.
#include <torch/extension.h>

#include "cuda/decode_kernel.cuh"
#include "cuda/prefill_kernel.cuh"
#include "cuda/decode_dispatch.cu"
#include "cuda/prefill_dispatch.cu"
#include "cuda_forward.h"

namespace {

namespace sc = softprompt::cuda;

// The binding's forward on an emulated sm_90 part with `num_sms` SMs; num_splits > 0 forces the
// decode plan's split count.
std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prompt_ids,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, int64_t num_splits, int64_t num_sms, std::optional<int64_t> window,
    std::optional<double> softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& prefix_offsets) {
  softprompt::CudaForwardTarget target;
  target.device_type = at::kCPU;
  target.sms = int(num_sms);
  target.major = 9;
  target.forced_splits = int(num_splits);
  auto [out, lse, err] = softprompt::cuda_forward(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                                                  key_padding_mask, causal, scale, window, softcap, sinks,
                                                  prefix_offsets, target);
  TORCH_CHECK(err == 0, "emulated launch failed with error ", err);
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
  m.def("forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("prompt_ids"), py::arg("prefix_lens"), py::arg("key_padding_mask"), py::arg("causal"),
        py::arg("scale"), py::arg("num_splits"), py::arg("num_sms"), py::arg("window") = py::none(),
        py::arg("softcap") = py::none(), py::arg("sinks") = py::none(), py::arg("prefix_offsets") = py::none());
  m.def("decode_plan", &decode_plan);
  m.def("decode_max_queries", [] { return int64_t(sc::kDecodeMaxQueries); });
}
