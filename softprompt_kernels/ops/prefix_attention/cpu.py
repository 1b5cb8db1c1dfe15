"""The C++ op pair ``softprompt_kernels::prefix_attention_fwd/bwd`` and the ``cpu`` backend.

The schemas come from the contract (contract.FORWARD_SCHEMA, BACKWARD_SCHEMA); the extension registers a CPU
kernel (csrc/cpu, fused: no copies, online softmax) and, when built with CUDA, the CUDA forward
(csrc/prefix_attention/cuda_forward.h; the cuda backend, cuda.py, runs it). Fake kernels and autograd are the
contract's and autograd.py's, shared with the Triton pair. With them ``torch.compile(fullgraph=True)`` traces
through the op and ``opcheck`` passes.
"""
from __future__ import annotations

import torch

from ..backends import Backend, needs_device, needs_no_dropout, needs_no_varlen, register_backend
from .. import extension
from ..extension import define, extension_loaded
from .autograd import register_prefix_attention_autograd
from .contract import BACKWARD_SCHEMA, FORWARD_SCHEMA, backward_fake, forward_fake

FORWARD, BACKWARD = "prefix_attention_fwd", "prefix_attention_bwd"

if extension_loaded():
    define(FORWARD, FORWARD_SCHEMA)
    define(BACKWARD, BACKWARD_SCHEMA)
    torch.library.register_fake(f"softprompt_kernels::{FORWARD}", forward_fake)
    torch.library.register_fake(f"softprompt_kernels::{BACKWARD}", backward_fake)
    register_prefix_attention_autograd(f"softprompt_kernels::{FORWARD}",
                                       torch.ops.softprompt_kernels.prefix_attention_bwd)


def run_extension_op(inputs, return_lse: bool):
    """The C++ extension's op (its CPU or CUDA kernel, chosen by the dispatcher from the device)."""
    out, lse = torch.ops.softprompt_kernels.prefix_attention_fwd(*inputs.kernel_arguments())
    return out, (lse if return_lse else None)


class CpuBackend(Backend):
    op = "prefix_attention"
    name = "cpu"
    description = "fused C++ kernel: no copies, online softmax, at::parallel_for (forward and backward)"

    def unavailable_reason(self):
        return extension.EXTENSION_ERROR  # read at call time: tests pretend a failed build

    def not_supported_reasons(self, inputs):
        return (super().not_supported_reasons(inputs) + needs_device(self, inputs, "cpu")
                + needs_no_dropout(self, inputs) + needs_no_varlen(self, inputs))

    def run(self, inputs, return_lse):
        return run_extension_op(inputs, return_lse)


register_backend(CpuBackend())
