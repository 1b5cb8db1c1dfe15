"""Registration of the fused prompt-insertion ops: fake kernels and autograd.

Schemas and the CPU/CUDA kernels live in csrc/prompt_insertion_bindings.cpp:

- ``insert_prompt_fwd(input_ids [B, n], weight [V, d], prompt [k, d]) -> out [B, k + n, d]`` (weight's dtype);
- ``insert_prompt_bwd(grad_out [B, L, d], k) -> grad_prompt [k, d]``: the sum over rows of ``grad_out[:, :k]``,
  float32 (float64 for float64 ``grad_out``), deterministic.

The prompt gradient comes from ``insert_prompt_bwd`` cast to the prompt's dtype; the weight gradient (rare: the
model is frozen) from ``aten.embedding_backward``. ``insert_prompt_bwd`` is differentiable too (double backward). With
these, ``torch.compile(fullgraph=True)`` traces through the
op and ``torch.library.opcheck`` passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from ._common import accumulation_dtype

FWD = "softprompt_kernels::insert_prompt_fwd"
BWD = "softprompt_kernels::insert_prompt_bwd"


def _ops_loaded() -> bool:
    return _ops.extension_loaded() and hasattr(torch.ops.softprompt_kernels, "insert_prompt_fwd")


def _kernel_status(device_type: str) -> Optional[str]:
    if not _ops_loaded():
        return _ops.EXTENSION_ERROR or "the C++ extension was built without the prompt-insertion ops"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(FWD, device_type.upper()):
        return f"the C++ extension was built without {device_type.upper()} kernels"
    return None


# Fixed once the extension is loaded; read from a dict so that torch.compile traces through the lookup.
_STATUS = {device_type: _kernel_status(device_type) for device_type in ("cpu", "cuda")}


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when this install has the fused kernel for ``device_type`` ("cpu" or "cuda"), else why not."""
    if device_type not in _STATUS:
        return f"no fused insertion kernel for device type {device_type!r}"
    return _STATUS[device_type]


def _setup_context(ctx, inputs, output):
    input_ids, weight, prompt = inputs
    ctx.save_for_backward(input_ids)  # for the weight gradient; a [B, n] int tensor, not copied
    ctx.k, ctx.num_weights, ctx.prompt_dtype = prompt.shape[0], weight.shape[0], prompt.dtype


def _backward(ctx, grad_out):
    (input_ids,) = ctx.saved_tensors
    grad_weight = grad_prompt = None
    if ctx.needs_input_grad[1]:
        grad_weight = torch.ops.aten.embedding_backward(grad_out[:, ctx.k:], input_ids, ctx.num_weights, -1,
                                                       False, False)
    if ctx.needs_input_grad[2]:
        grad_prompt = torch.ops.softprompt_kernels.insert_prompt_bwd(grad_out, ctx.k).to(ctx.prompt_dtype)
    return None, grad_weight, grad_prompt


def _bwd_setup_context(ctx, inputs, output):
    grad_out, k = inputs
    ctx.shape, ctx.dtype, ctx.k = grad_out.shape, grad_out.dtype, k


def _bwd_backward(ctx, grad_grad_prompt):
    # insert_prompt_bwd is linear in grad_out; its adjoint writes the incoming [k, d] into every row's first k slots.
    grad_grad_out = grad_grad_prompt.new_zeros(ctx.shape, dtype=ctx.dtype)
    grad_grad_out[:, :ctx.k] = grad_grad_prompt.to(ctx.dtype)
    return grad_grad_out, None


if _ops_loaded():

    @torch.library.register_fake(FWD)
    def _fwd_fake(input_ids, weight, prompt):
        B, n = input_ids.shape
        return weight.new_empty((B, prompt.shape[0] + n, weight.shape[1]))

    @torch.library.register_fake(BWD)
    def _bwd_fake(grad_out, k):
        return grad_out.new_empty((k, grad_out.shape[2]), dtype=accumulation_dtype(grad_out.dtype))

    torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
    torch.library.register_autograd(BWD, _bwd_backward, setup_context=_bwd_setup_context)  # double backward
