// The Python module softprompt_kernels._C. Loading it registers the ops' kernels (prefix_attention/ops.cpp,
// prompt_insertion/ops.cpp); the ops' schemas, fake kernels and autograd come from Python
// (softprompt_kernels/ops/). What the module itself exposes: how it was built.
#include <torch/extension.h>

#include "cpu/blas.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "softprompt_kernels C++ extension: registers the kernels of the softprompt_kernels:: ops.";
  m.def("blas_in_use", []() { return softprompt::cpu::blas_usable<float>(); },
        "True when the CPU kernel's block products run on torch's BLAS (else portable loops).");
#ifdef SOFTPROMPT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
