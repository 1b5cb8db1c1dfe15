"""Registration of the C++ ops (schemas live in csrc/bindings.cpp): fake kernels and autograd.

``torch.ops.softprompt_kernels.prefix_attention_fwd`` returns ``(out, lse)``;
``prefix_attention_bwd`` returns the five gradients (those that ``seq_grads=False`` or
``prefix_grads=False`` turn off come back empty, shape [0]). With the fake kernels below,
``torch.compile(fullgraph=True)`` traces through the op and ``opcheck`` passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._autograd import prefix_attention_autograd

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


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bshd_like(shape, like: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, L, D] tensor laid out as [B, L, H, D], as the kernels allocate it."""
    B, H, L, D = shape
    return like.new_empty((B, L, H, D)).transpose(1, 2)


if _C is not None:

    @torch.library.register_fake("softprompt_kernels::prefix_attention_fwd")
    def _fwd_fake(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal, scale):
        B, Hq, Lq, _ = q.shape
        return _bshd_like(q.shape, q), q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake("softprompt_kernels::prefix_attention_bwd")
    def _bwd_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                  key_padding_mask, out, lse, causal, scale, seq_grads=True, prefix_grads=True):
        seq = ((_bshd_like(q.shape, q), _bshd_like(k.shape, k), _bshd_like(v.shape, v)) if seq_grads
               else (q.new_empty(0), q.new_empty(0), q.new_empty(0)))
        prefix = ((torch.empty_like(prefix_k, memory_format=torch.contiguous_format),
                   torch.empty_like(prefix_v, memory_format=torch.contiguous_format)) if prefix_grads
                  else (q.new_empty(0), q.new_empty(0)))
        return (*seq, *prefix)

    _backward, _setup_context = prefix_attention_autograd(torch.ops.softprompt_kernels.prefix_attention_bwd,
                                                          input_mask=True)
    torch.library.register_autograd("softprompt_kernels::prefix_attention_fwd", _backward,
                                    setup_context=_setup_context)
