// The one place that turns a prefix-attention op call into kernel parameters: the arguments read by name
// (op_args.h), checked, laid out for the kernels (PreparedInputs), and the plain structs of params.h filled from
// them (make_params, make_grad_params). Used by the CPU and CUDA kernels of ops.cpp and by the CUDA forward's
// dispatch (cuda_forward.h). The Python API checks the same things first with friendlier messages; these checks
// keep direct calls of torch.ops.softprompt_kernels.* from crashing or reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "op_args.h"
#include "prefix_attention/params.h"

namespace softprompt {

struct PreparedInputs {
  at::Tensor q, k, v, prefix_k, prefix_v;          // last dimension contiguous
  at::Tensor prompt_ids, prefix_lens, padding_mask;  // int64 / int64 / bool, or undefined
  int64_t B, Hq, Hkv, Lq, Lk, P, K, D;
  bool causal;
  double scale;
  int64_t window = 0;   // 0: no sliding window
  double softcap = 0;   // 0: no soft-capping
  at::Tensor sinks;     // [Hq] contiguous in the accumulation dtype, or undefined
  at::Tensor prefix_offsets;  // [B] int64 contiguous, or undefined
};

struct PreparedGradInputs {
  at::Tensor grad_out, grad_lse, out, lse;
};

struct GradOutputs {
  at::Tensor q, k, v, prefix_k, prefix_v;
  at::Tensor prefix_partial_k, prefix_partial_v;  // CPU scratch, or undefined
};

// Copies only when the kernel cannot read the tensor as rows of D contiguous elements.
inline at::Tensor as_row_layout(const at::Tensor& t) {
  const int64_t D = t.size(-1), L = t.size(-2);
  const bool last_ok = D <= 1 || t.stride(-1) == 1;
  const bool rows_ok = L <= 1 || t.stride(-2) >= D;
  return last_ok && rows_ok ? t : t.contiguous();
}

inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_attention_tensor(const at::Tensor& t, const char* name, const at::Tensor& q,
                                   at::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must have rank 4, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ",
                   q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == device_type && t.device() == q.device(), name,
                    " must be on q's device ", q.device(), ", got ", t.device());
}

// The forward's arguments (and the backward's, which carry them too), by their contract names.
inline PreparedInputs prepare_inputs(const OpArgs& args, at::DeviceType device_type) {
  const at::Tensor q = args.tensor("q"), k = args.tensor("k"), v = args.tensor("v");
  const at::Tensor prefix_k = args.tensor("prefix_k"), prefix_v = args.tensor("prefix_v");
  const auto prompt_ids = args.optional_tensor("prompt_ids"), prefix_lens = args.optional_tensor("prefix_lens");
  const auto key_padding_mask = args.optional_tensor("key_padding_mask");
  const auto sinks = args.optional_tensor("sinks"), prefix_offsets = args.optional_tensor("prefix_offsets");
  const bool causal = args.flag("causal");
  const double scale = args.real("scale");
  const std::optional<int64_t> window = args.optional_integer("window");
  const std::optional<double> softcap = args.optional_real("softcap");
  // The C++ kernels have no variable-length rows yet (the Python backends refuse them first).
  TORCH_CHECK_NOT_IMPLEMENTED(!args.optional_tensor("cu_seqlens").has_value(),
                              "the C++ kernels have no variable-length rows (cu_seqlens) yet; "
                              "prefix_attention(backend='torch') has");
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                       dtype == at::kHalf,
                   "q must be float32, float64, bfloat16 or float16, got ", dtype);
  check_attention_tensor(q, "q", q, device_type);
  check_attention_tensor(k, "k", q, device_type);
  check_attention_tensor(v, "v", q, device_type);
  check_attention_tensor(prefix_k, "prefix_k", q, device_type);
  check_attention_tensor(prefix_v, "prefix_v", q, device_type);

  PreparedInputs in;
  in.B = q.size(0), in.Hq = q.size(1), in.Lq = q.size(2), in.D = q.size(3);
  in.Hkv = k.size(1), in.Lk = k.size(2), in.P = prefix_k.size(0), in.K = prefix_k.size(2);
  TORCH_CHECK_VALUE(in.D >= 1, "q must have a head dimension of at least 1, got shape ", q.sizes());
  // k and v each against q first, so that the message names the tensor that is wrong
  TORCH_CHECK_VALUE(k.size(0) == in.B && k.size(3) == in.D, "k must have shape [B=", in.B,
                    ", Hkv, Lk, D=", in.D, "], got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == in.B && v.size(3) == in.D, "v must have shape [B=", in.B,
                    ", Hkv, Lk, D=", in.D, "], got ", v.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "k and v must have the same shape [B, Hkv, Lk, D], got k ",
                    k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(in.Hkv >= 1 && in.Hq % in.Hkv == 0, "q heads (", in.Hq,
                    ") must be a multiple of k heads (", in.Hkv, ")");
  // Lq > Lk only for prefix-only attention (no sequence keys: Lk = 0, non-causal, no window), where the
  // bottom-right alignment of queries to keys has nothing to align to (docs/DESIGN.md section 2).
  TORCH_CHECK_VALUE(in.Lq <= in.Lk || (in.Lk == 0 && !causal && !window.has_value()), "q length (", in.Lq,
                    ") must not exceed k length (", in.Lk, ") unless k is empty (Lk = 0) with causal=False and "
                    "no window (prefix-only attention)");
  TORCH_CHECK_VALUE(prefix_k.size(1) == in.Hkv && prefix_k.size(3) == in.D,
                    "prefix_k must have shape [P, Hkv=", in.Hkv, ", K, D=", in.D, "], got ",
                    prefix_k.sizes());
  TORCH_CHECK_VALUE(prefix_v.sizes() == prefix_k.sizes(), "prefix_v must have prefix_k's shape ",
                    prefix_k.sizes(), ", got ", prefix_v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  if (window.has_value()) {
    TORCH_CHECK_VALUE(*window >= 1, "window must be >= 1, got ", *window);
    in.window = *window;
  }
  if (softcap.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*softcap) && *softcap > 0, "softcap must be finite and > 0, got ", *softcap);
    in.softcap = *softcap;
  }
  if (sinks.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(sinks->scalar_type()), "sinks must be floating point, got ",
                     sinks->scalar_type());
    TORCH_CHECK_VALUE(sinks->dim() == 1 && sinks->size(0) == in.Hq, "sinks must have shape [Hq=", in.Hq,
                      "], got ", sinks->sizes());
    TORCH_CHECK_VALUE(sinks->device() == q.device(), "sinks must be on q's device ", q.device(), ", got ",
                      sinks->device());
    in.sinks = sinks->to(accumulation_dtype(dtype)).contiguous();
  }
  if (prefix_offsets.has_value()) {
    const auto& offs = *prefix_offsets;
    TORCH_CHECK_TYPE(offs.scalar_type() == at::kLong || offs.scalar_type() == at::kInt,
                     "prefix_offsets must be int32 or int64, got ", offs.scalar_type());
    TORCH_CHECK_VALUE(offs.dim() == 1 && offs.size(0) == in.B, "prefix_offsets must have shape [B=", in.B,
                      "], got ", offs.sizes());
    TORCH_CHECK_VALUE(offs.device() == q.device(), "prefix_offsets must be on q's device ", q.device(), ", got ",
                      offs.device());
    in.prefix_offsets = offs.to(at::kLong).contiguous();
  }

  if (prompt_ids.has_value()) {
    const auto& ids = *prompt_ids;
    TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                     "prompt_ids must be int32 or int64, got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == in.B, "prompt_ids must have shape [B=", in.B,
                      "], got ", ids.sizes());
    TORCH_CHECK_VALUE(ids.device() == q.device(), "prompt_ids must be on q's device ", q.device(),
                      ", got ", ids.device());
    in.prompt_ids = ids.to(at::kLong).contiguous();
  } else {
    TORCH_CHECK_VALUE(in.P == 1, "prompt_ids=None requires exactly one prefix (prefix_k.shape[0] == 1), got ",
                      in.P);
  }
  if (prefix_lens.has_value()) {
    const auto& lens = *prefix_lens;
    TORCH_CHECK_TYPE(lens.scalar_type() == at::kLong || lens.scalar_type() == at::kInt,
                     "prefix_lens must be int32 or int64, got ", lens.scalar_type());
    TORCH_CHECK_VALUE(lens.dim() == 1 && lens.size(0) == in.P, "prefix_lens must have shape [P=", in.P,
                      "], got ", lens.sizes());
    TORCH_CHECK_VALUE(lens.device() == q.device(), "prefix_lens must be on q's device ", q.device(),
                      ", got ", lens.device());
    in.prefix_lens = lens.to(at::kLong).contiguous();
  }
  if (key_padding_mask.has_value()) {
    const auto& mask = *key_padding_mask;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "key_padding_mask must be bool, got ",
                     mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == in.B && mask.size(1) == in.Lk,
                      "key_padding_mask must have shape [B=", in.B, ", Lk=", in.Lk, "], got ",
                      mask.sizes());
    TORCH_CHECK_VALUE(mask.device() == q.device(), "key_padding_mask must be on q's device ",
                      q.device(), ", got ", mask.device());
    in.padding_mask = mask;
  }
  in.q = as_row_layout(q);
  in.k = as_row_layout(k);
  in.v = as_row_layout(v);
  in.prefix_k = as_row_layout(prefix_k);
  in.prefix_v = as_row_layout(prefix_v);
  in.causal = causal;
  in.scale = scale;
  return in;
}

// Range checks of prompt_ids / prefix_lens; host tensors only (no device sync).
inline void check_index_values_on_host(const PreparedInputs& in) {
  if (in.prompt_ids.defined() && in.B > 0) {
    const int64_t lo = in.prompt_ids.min().item<int64_t>(), hi = in.prompt_ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < in.P, "prompt_ids must lie in [-1, P=", in.P, "), got values in [",
                      lo, ", ", hi, "]");
  }
  if (in.prefix_lens.defined() && in.P > 0) {
    const int64_t lo = in.prefix_lens.min().item<int64_t>(), hi = in.prefix_lens.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= in.K, "prefix_lens must lie in [0, K=", in.K, "], got values in [",
                      lo, ", ", hi, "]");
  }
  if (in.prefix_offsets.defined() && in.B > 0) {
    const int64_t lo = in.prefix_offsets.min().item<int64_t>(), hi = in.prefix_offsets.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= in.Lk, "prefix_offsets must lie in [0, Lk=", in.Lk, "], got values in [",
                      lo, ", ", hi, "]");
  }
}

inline Strides4 strides_of(const at::Tensor& t) {
  // A length-1 row dimension may carry any stride; BLAS wants a row stride >= D.
  const int64_t row = t.size(2) <= 1 ? t.size(3) : t.stride(2);
  return {t.stride(0), t.stride(1), row};
}

// out is laid out as [B, Lq, Hq, D] (what Hugging Face reshapes to without a copy).
inline std::tuple<at::Tensor, at::Tensor> allocate_forward_outputs(const PreparedInputs& in) {
  at::Tensor out = at::empty({in.B, in.Lq, in.Hq, in.D}, in.q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({in.B, in.Hq, in.Lq},
                             in.q.options().dtype(accumulation_dtype(in.q.scalar_type())));
  return {out, lse};
}

inline PrefixAttentionParams make_params(const PreparedInputs& in) {
  PrefixAttentionParams p{};
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.prefix_k = in.prefix_k.data_ptr();
  p.prefix_v = in.prefix_v.data_ptr();
  p.prompt_ids = in.prompt_ids.defined() ? in.prompt_ids.data_ptr<int64_t>() : nullptr;
  p.prefix_lens = in.prefix_lens.defined() ? in.prefix_lens.data_ptr<int64_t>() : nullptr;
  p.key_padding_mask = in.padding_mask.defined() ? in.padding_mask.data_ptr<bool>() : nullptr;
  p.mask_stride_b = in.padding_mask.defined() ? in.padding_mask.stride(0) : 0;
  p.mask_stride_l = in.padding_mask.defined() ? in.padding_mask.stride(1) : 0;
  p.q_strides = strides_of(in.q);
  p.k_strides = strides_of(in.k);
  p.v_strides = strides_of(in.v);
  p.pk_strides = strides_of(in.prefix_k);
  p.pv_strides = strides_of(in.prefix_v);
  p.batch = in.B, p.heads_q = in.Hq, p.heads_kv = in.Hkv, p.len_q = in.Lq, p.len_k = in.Lk;
  p.num_prompts = in.P, p.prefix_slots = in.K, p.head_dim = in.D;
  p.causal = in.causal;
  p.scale = in.scale;
  p.window = in.window;
  p.softcap = in.softcap;
  p.sinks = in.sinks.defined() ? in.sinks.data_ptr() : nullptr;
  p.prefix_offsets = in.prefix_offsets.defined() ? in.prefix_offsets.data_ptr<int64_t>() : nullptr;
  return p;
}

inline void set_forward_outputs(PrefixAttentionParams& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr();
}

inline at::Tensor check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                             at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
  return t;
}

// The backward's own arguments: grad_out, grad_lse, out, lse.
inline PreparedGradInputs prepare_grad_inputs(const PreparedInputs& in, const OpArgs& args) {
  const at::Tensor grad_out = args.tensor("grad_out"), out = args.tensor("out"), lse = args.tensor("lse");
  const std::optional<at::Tensor> grad_lse = args.optional_tensor("grad_lse");
  const auto dtype = in.q.scalar_type(), acc = accumulation_dtype(dtype);
  const auto device = in.q.device();
  PreparedGradInputs g;
  g.grad_out = as_row_layout(check_like(grad_out, "grad_out", in.q.sizes(), dtype, device));
  g.out = as_row_layout(check_like(out, "out", in.q.sizes(), dtype, device));
  g.lse = check_like(lse, "lse", {in.B, in.Hq, in.Lq}, acc, device).contiguous();
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes(), "grad_lse must have shape ", lse.sizes(),
                      ", got ", grad_lse->sizes());
    TORCH_CHECK_VALUE(grad_lse->device() == device, "grad_lse must be on ", device);
    g.grad_lse = grad_lse->to(acc).contiguous();
  }
  return g;
}

// Gradients that are not wanted come back as empty tensors of shape [0] (never read or written).
inline GradOutputs allocate_grad_outputs(const PreparedInputs& in, bool seq_grads = true,
                                         bool prefix_grads = true) {
  const auto opts = in.q.options();
  GradOutputs g;
  if (seq_grads) {
    g.q = at::empty({in.B, in.Lq, in.Hq, in.D}, opts).transpose(1, 2);
    g.k = at::empty({in.B, in.Lk, in.Hkv, in.D}, opts).transpose(1, 2);
    g.v = at::empty({in.B, in.Lk, in.Hkv, in.D}, opts).transpose(1, 2);
  } else {
    g.q = at::empty({0}, opts);  // distinct tensors: outputs must not alias
    g.k = at::empty({0}, opts);
    g.v = at::empty({0}, opts);
  }
  if (!prefix_grads) {
    g.prefix_k = at::empty({0}, opts);
    g.prefix_v = at::empty({0}, opts);
    return g;
  }
  g.prefix_k = at::zeros({in.P, in.Hkv, in.K, in.D}, opts);
  g.prefix_v = at::zeros({in.P, in.Hkv, in.K, in.D}, opts);
  if (in.P > 0 && in.K > 0 && in.q.device().is_cpu()) {
    // through torch's allocator, so that memory profilers see the scratch too
    const auto acc = opts.dtype(accumulation_dtype(in.q.scalar_type()));
    g.prefix_partial_k = at::empty({in.B, in.Hkv, in.K, in.D}, acc);
    g.prefix_partial_v = at::empty({in.B, in.Hkv, in.K, in.D}, acc);
  }
  return g;
}

inline PrefixAttentionGradParams make_grad_params(const PreparedInputs& in, const PreparedGradInputs& gin,
                                                  const GradOutputs& grads) {
  PrefixAttentionGradParams p{};
  static_cast<PrefixAttentionParams&>(p) = make_params(in);
  p.out = const_cast<void*>(gin.out.data_ptr());
  p.out_strides = strides_of(gin.out);
  p.lse = const_cast<void*>(gin.lse.data_ptr());
  p.grad_out = gin.grad_out.data_ptr();
  p.grad_out_strides = strides_of(gin.grad_out);
  p.grad_lse = gin.grad_lse.defined() ? gin.grad_lse.data_ptr() : nullptr;
  p.seq_grads = grads.q.dim() == 4;
  p.prefix_grads = grads.prefix_k.dim() == 4;
  if (p.seq_grads) {
    p.grad_q = grads.q.data_ptr();
    p.grad_k = grads.k.data_ptr();
    p.grad_v = grads.v.data_ptr();
    p.grad_q_strides = strides_of(grads.q);
    p.grad_k_strides = strides_of(grads.k);
    p.grad_v_strides = strides_of(grads.v);
  }
  if (p.prefix_grads) {
    p.grad_prefix_k = grads.prefix_k.data_ptr();
    p.grad_prefix_v = grads.prefix_v.data_ptr();
    p.grad_pk_strides = strides_of(grads.prefix_k);
    p.grad_pv_strides = strides_of(grads.prefix_v);
  }
  p.prefix_partial_k = grads.prefix_partial_k.defined() ? grads.prefix_partial_k.data_ptr() : nullptr;
  p.prefix_partial_v = grads.prefix_partial_v.defined() ? grads.prefix_partial_v.data_ptr() : nullptr;
  return p;
}

}  // namespace softprompt
