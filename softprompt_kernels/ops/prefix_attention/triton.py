"""The Triton kernels (softprompt_kernels/triton/) as a torch op pair with autograd, and the ``triton`` backend.

``softprompt_kernels::triton_prefix_attention_fwd`` / ``..._bwd`` are registered with ``torch.library.triton_op``
so that ``torch.compile`` sees the kernels themselves; under the interpreter (TRITON_INTERPRET=1, CPU tensors) they
are plain custom ops. Their schemas are inferred from signatures built from the contract; the fake kernels and
autograd are the contract's, shared with the C++ pair.

Prefix gradients: deterministic by default (per-row partials reduced in row order);
``set_prefix_grad_mode("atomic")`` switches to fp32 atomics, which skips the partial buffer but is not bitwise
reproducible. ``torch.use_deterministic_algorithms(True)`` always forces the deterministic path.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...triton.common import FP32_HEAD_BLOCKS, TRITON_IMPORT_ERROR, head_block, interpreting
from ..backends import Backend, needs_no_dropout, needs_no_varlen, register_backend
from ..contract import Arg
from .autograd import register_prefix_attention_autograd
from .contract import BACKWARD_LEADING, BACKWARD_TRAILING, CONTRACT, backward_fake, forward_fake

_PREFIX_GRAD_MODES = ("deterministic", "atomic")
_prefix_grad_mode = "deterministic"
# the Triton backward's argument beyond the contract's
DETERMINISTIC = (Arg("deterministic", "bool", "reduce prefix gradients in row order (else fp32 atomics)"),)


def set_prefix_grad_mode(mode: str) -> None:
    """'deterministic' (default: bitwise reproducible) or 'atomic' (fp32 atomics)."""
    global _prefix_grad_mode
    if mode not in _PREFIX_GRAD_MODES:
        raise ValueError(f"mode must be one of {_PREFIX_GRAD_MODES}, got {mode!r}")
    _prefix_grad_mode = mode


def prefix_grad_mode() -> str:
    return _prefix_grad_mode


def _deterministic() -> bool:
    return _prefix_grad_mode == "deterministic" or torch.are_deterministic_algorithms_enabled()


def _as_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels index rows of D contiguous elements; copy only when a tensor is not laid out so."""
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """Index vectors are read as dense arrays (a no-op unless given a strided view)."""
    return None if t is None else t.contiguous()


# How each argument reaches the kernels' launchers.
_LAYOUT = {"q": _as_rows, "k": _as_rows, "v": _as_rows, "prefix_k": _as_rows, "prefix_v": _as_rows,
           "grad_out": _as_rows, "prompt_ids": _dense, "prefix_lens": _dense, "prefix_offsets": _dense,
           "sinks": lambda t: None if t is None else t.float().contiguous(),
           # read as a contiguous [B, Hq, Lq] array (often an expanded view, e.g. of lse.sum())
           "grad_lse": lambda t: None if t is None else t.float().contiguous()}


def _laid_out(named):
    return {name: _LAYOUT.get(name, lambda value: value)(value) for name, value in named.items()}


if TRITON_IMPORT_ERROR is None:
    from ...triton.backward import prefix_attention_bwd
    from ...triton.forward import prefix_attention_fwd

    _define = torch.library.custom_op if interpreting() else torch.library.triton_op

    def _forward(*args, **kwargs) -> Tuple[Tensor, Tensor]:
        return prefix_attention_fwd(**_laid_out(CONTRACT.named(args, kwargs)))

    def _backward(*args, **kwargs) -> List[Tensor]:
        named = CONTRACT.named(args, kwargs, BACKWARD_LEADING, (*BACKWARD_TRAILING, *DETERMINISTIC))
        return list(prefix_attention_bwd(**_laid_out(named)))

    _forward.__signature__ = CONTRACT.signature(returns=Tuple[Tensor, Tensor])
    _backward.__signature__ = CONTRACT.signature(BACKWARD_LEADING, (*BACKWARD_TRAILING, *DETERMINISTIC),
                                                 returns=List[Tensor])
    triton_forward = _define("softprompt_kernels::triton_prefix_attention_fwd", _forward, mutates_args=())
    triton_backward = _define("softprompt_kernels::triton_prefix_attention_bwd", _backward, mutates_args=())
    if interpreting():  # custom_op needs fake kernels; triton_op derives them by tracing
        triton_forward.register_fake(forward_fake)
        triton_backward.register_fake(lambda *a, **kw: list(backward_fake(*a, extra=DETERMINISTIC, **kw)))
    register_prefix_attention_autograd(triton_forward, torch.ops.softprompt_kernels.triton_prefix_attention_bwd,
                                       DETERMINISTIC, lambda: {"deterministic": _deterministic()})


class TritonBackend(Backend):
    op = "prefix_attention"
    name = "triton"
    description = "Triton kernels (FlashAttention-2 style) for CUDA GPUs: forward and backward, the training path"

    def unavailable_reason(self):
        if TRITON_IMPORT_ERROR is not None:
            return TRITON_IMPORT_ERROR
        if not interpreting() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
        return None

    def not_supported_reasons(self, inputs):
        reasons = (super().not_supported_reasons(inputs) + needs_no_dropout(self, inputs)
                   + needs_no_varlen(self, inputs))
        device = inputs.device.type
        if interpreting():
            if device != "cpu":
                reasons.append(f"under TRITON_INTERPRET=1 the triton backend takes CPU tensors, got {device}")
        elif device != "cuda":
            reasons.append(f"the triton backend needs CUDA tensors, got {device}")
        if inputs.dtype == torch.float64:
            reasons.append("the triton backend takes float16, bfloat16 and float32, not float64")
        if inputs.head_dim > 256:
            reasons.append(f"head dim {inputs.head_dim} > 256")
        elif (inputs.dtype == torch.float32 and not interpreting()
              and head_block(inputs.head_dim) not in FP32_HEAD_BLOCKS):
            reasons.append(f"float32 with head dim {inputs.head_dim} > {max(FP32_HEAD_BLOCKS)} has no spill-free "
                           "tile: use bfloat16/float16 (float32 accumulation) or backend='torch'")
        return reasons

    def run(self, inputs, return_lse):
        out, lse = torch.ops.softprompt_kernels.triton_prefix_attention_fwd(*inputs.kernel_arguments())
        return out, (lse if return_lse else None)


register_backend(TritonBackend())
