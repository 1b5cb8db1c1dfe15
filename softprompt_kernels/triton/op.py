"""The Triton kernels as torch ops with autograd, and the ``triton`` backend.

``softprompt_kernels::triton_prefix_attention_fwd`` / ``..._bwd`` are registered with
``torch.library.triton_op`` so that ``torch.compile`` sees the kernels themselves. Under
the interpreter (TRITON_INTERPRET=1, CPU tensors) they are plain custom ops.

Prefix gradients: deterministic by default (per-row partials reduced in row order);
``set_prefix_grad_mode("atomic")`` switches to fp32 atomics, which skips the partial
buffer but is not bitwise reproducible. ``torch.use_deterministic_algorithms(True)``
always forces the deterministic path.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._autograd import prefix_attention_autograd
from .._ops import backward_fake, forward_fake
from ..backends import Backend, register_backend
from .common import FP32_HEAD_BLOCKS, TRITON_IMPORT_ERROR, head_block, interpreting

_PREFIX_GRAD_MODES = ("deterministic", "atomic")
_prefix_grad_mode = "deterministic"


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


def _as_rows(t: Tensor) -> Tensor:
    """Kernels index rows of D contiguous elements; copy only when a tensor is not laid out so."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """prompt_ids / prefix_lens are read as dense vectors (a no-op unless given a strided view)."""
    return None if t is None else t.contiguous()


if TRITON_IMPORT_ERROR is None:
    from .backward import prefix_attention_bwd
    from .forward import prefix_attention_fwd

    _define = torch.library.custom_op if interpreting() else torch.library.triton_op

    @_define("softprompt_kernels::triton_prefix_attention_fwd", mutates_args=())
    def triton_prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                                    prompt_ids: Optional[Tensor], prefix_lens: Optional[Tensor],
                                    key_padding_mask: Optional[Tensor], causal: bool, scale: float,
                                    window: Optional[int] = None, softcap: Optional[float] = None,
                                    sinks: Optional[Tensor] = None,
                                    prefix_offsets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return prefix_attention_fwd(_as_rows(q), _as_rows(k), _as_rows(v), _as_rows(prefix_k), _as_rows(prefix_v),
                                    _dense(prompt_ids), _dense(prefix_lens), key_padding_mask, causal, scale,
                                    window, softcap, None if sinks is None else sinks.float().contiguous(),
                                    _dense(prefix_offsets))

    @_define("softprompt_kernels::triton_prefix_attention_bwd", mutates_args=())
    def triton_prefix_attention_bwd(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor,
                                    v: Tensor, prefix_k: Tensor, prefix_v: Tensor, prompt_ids: Optional[Tensor],
                                    prefix_lens: Optional[Tensor], key_padding_mask: Optional[Tensor],
                                    out: Tensor, lse: Tensor, causal: bool, scale: float,
                                    deterministic: bool, seq_grads: bool = True, prefix_grads: bool = True,
                                    window: Optional[int] = None, softcap: Optional[float] = None,
                                    prefix_offsets: Optional[Tensor] = None) -> List[Tensor]:
        # grad_lse is read as a contiguous [B, Hq, Lq] array (it is often an expanded view, e.g. of lse.sum())
        grad_lse = grad_lse.float().contiguous() if grad_lse is not None else None
        grads = prefix_attention_bwd(_as_rows(grad_out), grad_lse, _as_rows(q), _as_rows(k), _as_rows(v),
                                     _as_rows(prefix_k), _as_rows(prefix_v), _dense(prompt_ids), _dense(prefix_lens),
                                     key_padding_mask, out, lse, causal, scale, deterministic, seq_grads,
                                     prefix_grads, window, softcap, _dense(prefix_offsets))
        return list(grads)

    if interpreting():  # custom_op needs fake kernels; triton_op derives them by tracing
        triton_prefix_attention_fwd.register_fake(forward_fake)

        @triton_prefix_attention_bwd.register_fake
        def _(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse,
              causal, scale, deterministic, seq_grads=True, prefix_grads=True, window=None, softcap=None,
              prefix_offsets=None):
            return list(backward_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                                      key_padding_mask, out, lse, causal, scale, seq_grads, prefix_grads))

    _backward, _setup_context = prefix_attention_autograd(
        torch.ops.softprompt_kernels.triton_prefix_attention_bwd, extra_args=lambda: (_deterministic(),))
    triton_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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
        reasons = super().not_supported_reasons(inputs)
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
        out, lse = torch.ops.softprompt_kernels.triton_prefix_attention_fwd(
            inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prompt_ids, inputs.prefix_lens,
            inputs.key_padding_mask, inputs.causal, inputs.scale, inputs.window, inputs.softcap, inputs.sinks,
            inputs.prefix_offsets)
        return out, (lse if return_lse else None)


register_backend(TritonBackend())
