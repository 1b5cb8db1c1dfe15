"""The fused insertion op pair ``softprompt_kernels::insert_prompt_fwd/bwd`` and the ``cpu`` and ``cuda`` backends.

Schemas from the contract; kernels in csrc/prompt_insertion/ops.cpp (one pass writing every output row straight
from the prompt or the embedding matrix, no intermediate embedding tensor, the prompt never expanded). The prompt
gradient comes from ``insert_prompt_bwd`` cast to the prompt's dtype; the weight gradient (rare: the model is
frozen) from ``aten.embedding_backward``. ``insert_prompt_bwd`` is differentiable too (double backward). With
these, ``torch.compile(fullgraph=True)`` traces through the op and ``torch.library.opcheck`` passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import Backend, needs_device, register_backend
from ..extension import define, extension_loaded, kernel_status
from .contract import BACKWARD_SCHEMA, CONTRACT, FORWARD_SCHEMA, backward_fake, forward_fake

FWD = "softprompt_kernels::insert_prompt_fwd"
BWD = "softprompt_kernels::insert_prompt_bwd"


def _setup_context(ctx, inputs, output):
    named = CONTRACT.named(inputs)
    ctx.save_for_backward(named["input_ids"])  # for the weight gradient; a [B, n] int tensor, not copied
    ctx.k, ctx.num_weights, ctx.prompt_dtype = named["prompt"].shape[0], named["weight"].shape[0], named["prompt"].dtype


def _backward(ctx, grad_out):
    (input_ids,) = ctx.saved_tensors
    wanted = dict(zip(CONTRACT.by_name, ctx.needs_input_grad))
    grads = {}
    if wanted["weight"]:
        grads["weight"] = torch.ops.aten.embedding_backward(grad_out[:, ctx.k:], input_ids, ctx.num_weights, -1,
                                                            False, False)
    if wanted["prompt"]:
        grads["prompt"] = torch.ops.softprompt_kernels.insert_prompt_bwd(grad_out, ctx.k).to(ctx.prompt_dtype)
    return tuple(grads.get(name) for name in CONTRACT.by_name)


def _bwd_setup_context(ctx, inputs, output):
    grad_out, k = inputs
    ctx.shape, ctx.dtype, ctx.k = grad_out.shape, grad_out.dtype, k


def _bwd_backward(ctx, grad_grad_prompt):
    # insert_prompt_bwd is linear in grad_out; its adjoint writes the incoming [k, d] into every row's first k slots.
    grad_grad_out = grad_grad_prompt.new_zeros(ctx.shape, dtype=ctx.dtype)
    grad_grad_out[:, :ctx.k] = grad_grad_prompt.to(ctx.dtype)
    return grad_grad_out, None


if extension_loaded():
    define("insert_prompt_fwd", FORWARD_SCHEMA)
    define("insert_prompt_bwd", BACKWARD_SCHEMA)
    torch.library.register_fake(FWD, forward_fake)
    torch.library.register_fake(BWD, backward_fake)
    torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
    torch.library.register_autograd(BWD, _bwd_backward, setup_context=_bwd_setup_context)  # double backward

# Fixed once the extension is loaded; read from a dict so that torch.compile traces through the lookup.
_STATUS = {device_type: kernel_status("insert_prompt_fwd", device_type) for device_type in ("cpu", "cuda")}


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when this install has the fused kernel for ``device_type`` ("cpu" or "cuda"), else why not."""
    if device_type not in _STATUS:
        return f"no fused insertion kernel for device type {device_type!r}"
    return _STATUS[device_type]


class FusedInsertion(Backend):
    """The C++ kernel of one device type (the dispatcher picks it from the tensors' device)."""

    op = "insert_prompt"

    def __init__(self, device_type: str):
        self.name = device_type
        self.description = f"fused {device_type} kernel: every output row written once, prompt never expanded"

    def unavailable_reason(self):
        return unavailable_reason(self.name)

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs) + needs_device(self, inputs, self.name)
        if self.name == "cuda" and inputs.weight.dtype == torch.float64:
            reasons.append("the cuda kernel has no float64 (weight is float64): use float32, bfloat16 or float16")
        return reasons

    def run(self, inputs):
        return torch.ops.softprompt_kernels.insert_prompt_fwd(*inputs.kernel_arguments())


register_backend(FusedInsertion("cpu"))
register_backend(FusedInsertion("cuda"))
