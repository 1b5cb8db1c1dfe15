"""The C++ extension: its ops' fake kernels and autograd (schemas live in csrc/bindings.cpp), and the
``cpu`` backend of ``prefix_attention`` (the ``cuda`` backend, cuda_backend.py, calls the same op).

``torch.ops.softprompt_kernels.prefix_attention_fwd`` returns ``(out, lse)`` (window, softcap and sinks
optional: docs/DESIGN.md section 2);
``prefix_attention_bwd`` returns the five gradients (those that ``seq_grads=False`` or
``prefix_grads=False`` turn off come back empty, shape [0]). With the fake kernels below,
``torch.compile(fullgraph=True)`` traces through the op and ``opcheck`` passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._autograd import prefix_attention_autograd
from ._common import accumulation_dtype
from .backends import Backend, needs_device, register_backend

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    EXTENSION_ERROR: Optional[str] = None
except ImportError as exc:  # the package stays usable with the torch backend
    _C = None
    EXTENSION_ERROR = f"the C++ extension softprompt_kernels._C is not built or failed to load ({exc})"


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def _bshd_like(shape, like: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, L, D] tensor laid out as [B, L, H, D], as the kernels allocate it."""
    B, H, L, D = shape
    return like.new_empty((B, L, H, D)).transpose(1, 2)


def forward_fake(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal, scale, window=None,
                 softcap=None, sinks=None, prefix_offsets=None):
    """Shapes of a prefix-attention forward op's (out, lse); every backend's op pair has this contract."""
    B, Hq, Lq, _ = q.shape
    return _bshd_like(q.shape, q), q.new_empty((B, Hq, Lq), dtype=accumulation_dtype(q.dtype))


def backward_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out,
                  lse, causal, scale, seq_grads=True, prefix_grads=True, window=None, softcap=None,
                  prefix_offsets=None):
    """Shapes of a backward op's five gradients; ``seq_grads`` / ``prefix_grads`` False turn those into empty [0]."""
    seq = ((_bshd_like(q.shape, q), _bshd_like(k.shape, k), _bshd_like(v.shape, v)) if seq_grads
           else (q.new_empty(0), q.new_empty(0), q.new_empty(0)))
    prefix = ((torch.empty_like(prefix_k, memory_format=torch.contiguous_format),
               torch.empty_like(prefix_v, memory_format=torch.contiguous_format)) if prefix_grads
              else (q.new_empty(0), q.new_empty(0)))
    return (*seq, *prefix)


if _C is not None:

    torch.library.register_fake("softprompt_kernels::prefix_attention_fwd", forward_fake)
    torch.library.register_fake("softprompt_kernels::prefix_attention_bwd", backward_fake)

    _backward, _setup_context = prefix_attention_autograd(torch.ops.softprompt_kernels.prefix_attention_bwd)
    torch.library.register_autograd("softprompt_kernels::prefix_attention_fwd", _backward,
                                    setup_context=_setup_context)


def run_extension_op(inputs, return_lse: bool):
    """The C++ extension's op (its CPU or CUDA kernel, chosen by the dispatcher from the device)."""
    out, lse = torch.ops.softprompt_kernels.prefix_attention_fwd(
        inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prompt_ids,
        inputs.prefix_lens, inputs.key_padding_mask, inputs.causal, inputs.scale, inputs.window, inputs.softcap,
        inputs.sinks, inputs.prefix_offsets)
    return out, (lse if return_lse else None)


class CpuBackend(Backend):
    op = "prefix_attention"
    name = "cpu"
    description = "fused C++ kernel: no copies, online softmax, at::parallel_for (forward and backward)"

    def unavailable_reason(self):
        return EXTENSION_ERROR

    def not_supported_reasons(self, inputs):
        return super().not_supported_reasons(inputs) + needs_device(self, inputs, "cpu")

    def run(self, inputs, return_lse):
        return run_extension_op(inputs, return_lse)


register_backend(CpuBackend())
