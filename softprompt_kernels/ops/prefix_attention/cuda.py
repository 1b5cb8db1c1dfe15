"""The ``cuda`` backend: the C++/CUDA forward kernels (csrc/cuda) of the C++ op pair (cpu.py), for serving and
prefill.

``Lq <= 16`` runs the split-K decode kernel (prefix bank + each row's cache, GQA groups
sharing loads); longer queries run the tensor-core prefill kernel. Both are forward-only:
with gradients required the backend refuses the inputs, and ``auto`` takes Triton.
Under ``auto`` the decode shapes go to this backend first; prefill shapes go to Triton
until the CUDA prefill is measured faster on a GPU (``backend="cuda"`` runs it on request).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import Backend, needs_device, needs_no_dropout, needs_no_varlen, register_backend
from .. import extension
from .contract import ARGS
from .cpu import run_extension_op

DECODE_MAX_QUERIES = 16  # kDecodeMaxQueries in csrc/cuda/decode_params.h
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.bfloat16, torch.float16)


def _needs_grad(inputs) -> bool:
    tensors = (getattr(inputs, a.name) for a in ARGS if a.grad == "kernel")  # the backward op's gradients
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class CudaBackend(Backend):
    op = "prefix_attention"
    name = "cuda"
    description = "CUDA C++ kernels, forward only: split-K decode (Lq <= 16) and tensor-core prefill"

    def unavailable_reason(self) -> Optional[str]:
        if extension.EXTENSION_ERROR is not None:
            return extension.EXTENSION_ERROR
        if not extension.extension_has_cuda():
            return ("softprompt_kernels._C was built without CUDA sources (torch without CUDA, or "
                    "SOFTPROMPT_FORCE_CPU=1): rebuild with a CUDA build of torch")
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def not_supported_reasons(self, inputs):
        reasons = (super().not_supported_reasons(inputs) + needs_device(self, inputs, "cuda")
                   + needs_no_dropout(self, inputs) + needs_no_varlen(self, inputs))
        if not reasons and torch.cuda.get_device_capability(inputs.device)[0] < 8:
            reasons.append("the cuda backend needs compute capability 8.0 or newer")
        if inputs.dtype not in DTYPES:
            reasons.append(f"the cuda backend takes bfloat16 or float16, got {inputs.dtype}")
        if inputs.head_dim not in HEAD_DIMS:
            reasons.append(f"the cuda backend supports head dims {HEAD_DIMS}, got {inputs.head_dim} "
                           "(backend='triton' serves other head dims)")
        features = [name for name in ("window", "softcap", "sinks") if getattr(inputs, name) is not None]
        if features and inputs.len_q > DECODE_MAX_QUERIES:
            reasons.append(f"the cuda prefill kernel (Lq > {DECODE_MAX_QUERIES}) has no {', '.join(features)} "
                           "(backend='triton' has)")
        if _needs_grad(inputs):
            reasons.append("the cuda backend is forward-only: use backend='triton' (or 'auto') for training")
        return reasons

    def auto_declines(self, inputs) -> Optional[str]:
        if inputs.len_q > DECODE_MAX_QUERIES:
            return "prefill shapes go to triton under auto (the CUDA prefill has not been measured faster)"
        return None

    def run(self, inputs, return_lse):
        return run_extension_op(inputs, return_lse)


register_backend(CudaBackend())
