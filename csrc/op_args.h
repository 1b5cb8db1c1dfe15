// The arguments of a boxed op call, read by name.
//
// Every op's schema is defined from Python, from the op's contract (softprompt_kernels/ops/*/contract.py: the
// argument list, written once). The C++ kernels are registered as boxed functions and read their arguments by
// name from that schema, so they never depend on the argument order: adding an argument touches the contract and
// the code that reads it, nothing else.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>
#include <utility>

namespace softprompt {

class OpArgs {
 public:
  OpArgs(const c10::OperatorHandle& op, torch::jit::Stack* stack)
      : schema_(op.schema()), stack_(stack), count_(op.schema().arguments().size()) {}

  const c10::IValue& operator[](const char* name) const {
    const std::optional<int> index = schema_.argumentIndexWithName(name);
    TORCH_CHECK(index.has_value(), schema_.name(), " has no argument '", name,
                "': its schema (from the op's contract) and the C++ kernel disagree");
    return torch::jit::peek(*stack_, *index, count_);
  }

  at::Tensor tensor(const char* name) const { return (*this)[name].toTensor(); }
  std::optional<at::Tensor> optional_tensor(const char* name) const {
    return (*this)[name].toOptional<at::Tensor>();
  }
  bool flag(const char* name) const { return (*this)[name].toBool(); }
  double real(const char* name) const { return (*this)[name].toDouble(); }
  int64_t integer(const char* name) const { return (*this)[name].toInt(); }
  std::optional<double> optional_real(const char* name) const { return (*this)[name].toOptional<double>(); }
  std::optional<int64_t> optional_integer(const char* name) const { return (*this)[name].toOptional<int64_t>(); }

  // Replaces the arguments on the stack by the op's outputs, in the schema's order.
  template <typename... Outputs>
  void set_outputs(Outputs&&... outputs) const {
    torch::jit::drop(*stack_, count_);
    (torch::jit::push(*stack_, std::forward<Outputs>(outputs)), ...);
  }

 private:
  const c10::FunctionSchema& schema_;
  torch::jit::Stack* stack_;
  size_t count_;
};

}  // namespace softprompt
