// The kernels of softprompt_kernels::insert_prompt_fwd / insert_prompt_bwd, registered per dispatch key, and the
// one place that turns their arguments (read by name, op_args.h) into kernel parameters (prepare_insertion,
// make_params, make_grad_params). The schemas, fake kernels and autograd are defined from Python
// (softprompt_kernels/ops/insert_prompt/).
//
//   insert_prompt_fwd(input_ids [B, n] int32/int64, weight [V, d], prompt [k, d])
//       -> out [B, k + n, d], weight's dtype, contiguous
//   insert_prompt_bwd(grad_out [B, L >= k, d], k)
//       -> grad_prompt [k, d] = sum over b of grad_out[b, :k], float32 (float64 for
//          float64 grad_out), summed in a fixed order (deterministic)
//
// The prompt may have another floating dtype than weight (an fp32 parameter over a
// bf16 model): it is cast to weight's dtype, as the output holds it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/prompt_insertion_cpu.h"
#include "op_args.h"
#include "prompt_insertion/params.h"

#ifdef SOFTPROMPT_WITH_CUDA
// c10's stream header rather than ATen/cuda/CUDAContext.h: the same current stream
// (at::cuda::getCurrentCUDAStream is c10::cuda's), without cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/prompt_insertion_launch.h"
#endif

namespace softprompt {
namespace {

struct InsertionInputs {
  at::Tensor ids;     // [B, n] int64, any strides
  at::Tensor weight;  // [V, d], last dimension contiguous
  at::Tensor prompt;  // [k, d], weight's dtype, contiguous
};

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

InsertionInputs prepare_insertion(const OpArgs& args, at::DeviceType device_type) {
  const at::Tensor input_ids = args.tensor("input_ids"), weight = args.tensor("weight"), prompt = args.tensor("prompt");
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "input_ids must be a [B, n] tensor, got shape ", input_ids.sizes());
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
                   "input_ids must be int32 or int64, got ", input_ids.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be the [V, d] embedding matrix, got shape ", weight.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(weight.scalar_type()),
                   "weight must be float16, bfloat16, float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(prompt.dim() == 2 && prompt.size(1) == weight.size(1), "prompt must have shape [k, d=",
                    weight.size(1), "], got ", prompt.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(prompt.scalar_type()),
                   "prompt must be float16, bfloat16, float32 or float64, got ", prompt.scalar_type());
  TORCH_CHECK_VALUE(weight.device().type() == device_type, "weight must be a ", device_type,
                    " tensor for this kernel, got device ", weight.device());
  TORCH_CHECK_VALUE(input_ids.device() == weight.device(), "input_ids must be on weight's device ",
                    weight.device(), ", got ", input_ids.device());
  TORCH_CHECK_VALUE(prompt.device() == weight.device(), "prompt must be on weight's device ", weight.device(),
                    ", got ", prompt.device());
  InsertionInputs in;
  in.ids = input_ids.to(at::kLong);  // int64 ids are used in place, strides and all
  in.weight = weight.size(1) <= 1 || weight.stride(1) == 1 ? weight : weight.contiguous();
  in.prompt = prompt.to(weight.scalar_type()).contiguous();  // [k, d]: small
  return in;
}

InsertPromptParams make_params(const InsertionInputs& in, const at::Tensor& out) {
  InsertPromptParams p{};
  p.input_ids = in.ids.data_ptr<int64_t>();
  p.ids_stride_b = in.ids.stride(0);
  p.ids_stride_t = in.ids.stride(1);
  p.weight = in.weight.data_ptr();
  p.weight_stride_v = in.weight.stride(0);
  p.prompt = in.prompt.data_ptr();
  p.prompt_stride_k = in.prompt.stride(0);
  p.out = out.data_ptr();
  p.batch = in.ids.size(0);
  p.num_ids = in.ids.size(1);
  p.prompt_len = in.prompt.size(0);
  p.dim = in.weight.size(1);
  p.vocab = in.weight.size(0);
  return p;
}

at::Tensor allocate_output(const InsertionInputs& in) {
  return at::empty({in.ids.size(0), in.prompt.size(0) + in.ids.size(1), in.weight.size(1)}, in.weight.options());
}

// The backward's arguments: (grad_out [B, L, d], k).
std::pair<at::Tensor, int64_t> prepare_grad(const OpArgs& args, at::DeviceType device_type) {
  const at::Tensor grad_out = args.tensor("grad_out");
  const int64_t k = args.integer("k");
  TORCH_CHECK_VALUE(grad_out.dim() == 3, "grad_out must have shape [B, k + n, d], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(grad_out.scalar_type()),
                   "grad_out must be float16, bfloat16, float32 or float64, got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(k >= 0 && k <= grad_out.size(1), "k must lie in [0, ", grad_out.size(1),
                    "] (grad_out's sequence length), got ", k);
  TORCH_CHECK_VALUE(grad_out.device().type() == device_type, "grad_out must be a ", device_type,
                    " tensor for this kernel, got device ", grad_out.device());
  return {grad_out, k};
}

InsertPromptGradParams make_grad_params(const at::Tensor& grad_out, const at::Tensor& grad_prompt) {
  InsertPromptGradParams p{};
  p.grad_out = grad_out.data_ptr();
  p.grad_stride_b = grad_out.stride(0);
  p.grad_stride_t = grad_out.stride(1);
  p.grad_stride_d = grad_out.stride(2);
  p.grad_prompt = grad_prompt.data_ptr();
  p.batch = grad_out.size(0);
  p.prompt_len = grad_prompt.size(0);
  p.dim = grad_prompt.size(1);
  return p;
}

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The host holds the ids, so the range check costs one pass over [B, n].
void check_ids_on_host(const at::Tensor& ids, int64_t vocab) {
  if (ids.numel() == 0) return;
  auto [lo, hi] = at::aminmax(ids);
  const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < vocab, "input_ids must lie in [0, V=", vocab,
                    ") (rows of weight), got values in [", low, ", ", high, "]");
}

void insert_prompt_fwd_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  InsertionInputs in = prepare_insertion(args, at::kCPU);
  check_ids_on_host(in.ids, in.weight.size(0));
  at::Tensor out = allocate_output(in);
  const InsertPromptParams params = make_params(in, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.weight.scalar_type(), "insert_prompt_fwd_cpu",
                                  [&] { cpu::insert_prompt_forward<scalar_t>(params); });
  args.set_outputs(std::move(out));
}

void insert_prompt_bwd_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  const auto [grad_out, k] = prepare_grad(args, at::kCPU);
  at::Tensor grad_prompt =
      at::empty({k, grad_out.size(2)}, grad_out.options().dtype(accumulation_dtype(grad_out.scalar_type())));
  const InsertPromptGradParams params = make_grad_params(grad_out, grad_prompt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "insert_prompt_bwd_cpu",
                                  [&] { cpu::insert_prompt_backward<scalar_t>(params); });
  args.set_outputs(std::move(grad_prompt));
}

#ifdef SOFTPROMPT_WITH_CUDA
// The kernels' element types; float64 is not built for CUDA.
int cuda_dtype_code(at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
                   " must be float32, bfloat16 or float16 for the CUDA kernel, got ", dtype,
                   " (use backend='torch' for float64)");
  return dtype == at::kFloat ? cuda::kInsertPromptFloat32
         : dtype == at::kBFloat16 ? cuda::kInsertPromptBFloat16 : cuda::kInsertPromptFloat16;
}

// Ids are not range-checked here (that would sync): an id outside [0, V) gives a NaN
// row. insert_prompt(validate=True) checks them in Python first.
void insert_prompt_fwd_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  InsertionInputs in = prepare_insertion(args, at::kCUDA);
  const int code = cuda_dtype_code(in.weight.scalar_type(), "weight");
  const c10::cuda::CUDAGuard guard(in.weight.device());
  at::Tensor out = allocate_output(in);
  if (out.numel() > 0) {
    const bool launched =
        cuda::launch_insert_prompt_fwd(make_params(in, out), code, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(launched, "insert_prompt_fwd: no CUDA kernel for dtype ", in.weight.scalar_type());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  args.set_outputs(std::move(out));
}

void insert_prompt_bwd_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpArgs args(op, stack);
  const auto [grad_out, k] = prepare_grad(args, at::kCUDA);
  const int code = cuda_dtype_code(grad_out.scalar_type(), "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor grad_prompt = at::empty({k, grad_out.size(2)}, grad_out.options().dtype(at::kFloat));
  if (grad_prompt.numel() > 0) {
    const bool launched = cuda::launch_insert_prompt_bwd(make_grad_params(grad_out, grad_prompt), code,
                                                         c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(launched, "insert_prompt_bwd: no CUDA kernel for dtype ", grad_out.scalar_type());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  args.set_outputs(std::move(grad_prompt));
}
#endif

}  // namespace
}  // namespace softprompt

TORCH_LIBRARY_IMPL(softprompt_kernels, CPU, m) {
  m.impl("insert_prompt_fwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::insert_prompt_fwd_cpu>());
  m.impl("insert_prompt_bwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::insert_prompt_bwd_cpu>());
}

#ifdef SOFTPROMPT_WITH_CUDA
TORCH_LIBRARY_IMPL(softprompt_kernels, CUDA, m) {
  m.impl("insert_prompt_fwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::insert_prompt_fwd_cuda>());
  m.impl("insert_prompt_bwd", torch::CppFunction::makeFromBoxedFunction<&softprompt::insert_prompt_bwd_cuda>());
}
#endif
