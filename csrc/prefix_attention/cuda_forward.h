// The CUDA forward of prefix_attention, from the op's arguments to a kernel launch: dtype and head-dim
// checks, 16-byte-load layouts, the decode (Lq <= kDecodeMaxQueries, split-K with a workspace) or prefill
// choice, outputs. Host C++ (no CUDA headers). Shared by the CUDA kernel of ops.cpp on a GPU and by the
// SIMT emulator tests (tests/cuda_emulation/emulated_ops.cpp), which run this same code, and the same
// launch_* dispatch of csrc/cuda/*_dispatch.cu, on CPU tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/decode_launch.h"
#include "cuda/prefill_launch.h"
#include "prefix_attention/prepare.h"

namespace softprompt {

// Where the forward runs: the tensors' device type (kCUDA; kCPU under the emulator), the SM count the
// decode plan is made for, the compute capability, the stream, and (tests) a forced split count.
struct CudaForwardTarget {
  at::DeviceType device_type = at::kCUDA;
  int sms = 1, major = 0, minor = 0;
  cudaStream_t stream = nullptr;
  int forced_splits = 0;  // > 0: the decode plan uses this many splits (covers the combine pass)
};

// The kernels read rows with 16-byte loads: base pointer and every stride must allow them.
inline bool allows_vector_loads(const at::Tensor& t) {
  if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

inline at::Tensor for_vector_loads(const at::Tensor& t) {
  return allows_vector_loads(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Runs the forward on the op's arguments (prefix_attention_fwd's, read by name); returns (out [B, Hq, Lq, D],
// lse [B, Hq, Lq] float32, a cudaError_t value).
inline std::tuple<at::Tensor, at::Tensor, int> cuda_forward(const OpArgs& args, const CudaForwardTarget& target) {
  PreparedInputs in = prepare_inputs(args, target.device_type);
  const auto dtype = in.q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf,
                   "the cuda backend takes bfloat16 or float16 q, got ", dtype,
                   " (backend='triton' or 'torch' take float32)");
  TORCH_CHECK_VALUE(cuda::supports_head_dim(in.D),
                    "the cuda backend supports head dims 64, 128 and 256, got ", in.D,
                    " (backend='triton' serves other head dims)");
  TORCH_CHECK_VALUE(target.major >= 8, "the cuda backend needs compute capability 8.0 or newer, got ",
                    target.major, ".", target.minor);
  in.q = for_vector_loads(in.q);
  in.k = for_vector_loads(in.k);
  in.v = for_vector_loads(in.v);
  in.prefix_k = for_vector_loads(in.prefix_k);
  in.prefix_v = for_vector_loads(in.prefix_v);
  auto [out, lse] = allocate_forward_outputs(in);
  if (out.numel() == 0) return {out, lse, 0};

  PrefixAttentionParams params = make_params(in);
  set_forward_outputs(params, out, lse);
  const auto half = dtype == at::kBFloat16 ? cuda::HalfType::kBFloat16 : cuda::HalfType::kFloat16;
  if (in.Lq > cuda::kDecodeMaxQueries) {
    TORCH_CHECK_VALUE(in.window == 0 && in.softcap == 0 && !in.sinks.defined(),
                      "the cuda prefill kernel (Lq > ", cuda::kDecodeMaxQueries, ") has no window, softcap or "
                      "sinks: use backend='triton' (auto does)");
    return {out, lse, cuda::launch_prefix_prefill(params, half, target.stream)};
  }
  cuda::DecodeParams decode{};
  decode.attn = params;
  const cuda::DecodePlan plan = target.forced_splits > 0
                                    ? cuda::plan_decode_with_splits(params, target.forced_splits)
                                    : cuda::plan_decode(params, target.sms);
  decode.num_splits = plan.num_splits;
  decode.keys_per_split = plan.keys_per_split;
  decode.query_block = plan.query_block;
  decode.query_tiles = plan.query_tiles;
  at::Tensor partial_out, partial_lse;  // from the caching allocator: no cudaMalloc, graph-capturable
  if (plan.num_splits > 1) {
    const auto f32 = in.q.options().dtype(at::kFloat);
    partial_out = at::empty({plan.num_splits, in.B, in.Hq, in.Lq, in.D}, f32);
    partial_lse = at::empty({plan.num_splits, in.B, in.Hq, in.Lq}, f32);
    decode.partial_out = partial_out.data_ptr<float>();
    decode.partial_lse = partial_lse.data_ptr<float>();
  }
  return {out, lse, cuda::launch_prefix_decode(decode, half, target.stream)};
}

}  // namespace softprompt
