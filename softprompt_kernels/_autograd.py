"""Autograd of a prefix-attention forward op, shared by every backend's op pair.

A forward op ``(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal,
scale) -> (out, lse)`` is differentiated by its backward op ``(grad_out, grad_lse, q, k, v,
prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse, causal, scale, *extra)
-> (dq, dk, dv, dprefix_k, dprefix_v)``. The lse is differentiable; an unused output's gradient
arrives as None (no zeros are materialised for it).

With ``input_mask=True`` the backward op also takes ``(seq_grads, prefix_grads)`` after the extra
arguments, from autograd's ``needs_input_grad``: whether q, k or v, and whether prefix_k or prefix_v,
need a gradient (a frozen model's first layer: only the prefix does). The op skips the others' work
and returns them empty; they are passed on as None.
"""
from typing import Callable, Tuple

import torch


def prefix_attention_autograd(backward_op: Callable, extra_args: Callable[[], Tuple] = tuple,
                              input_mask: bool = False):
    """(backward, setup_context) for ``register_autograd``; ``extra_args()`` is read at forward time."""

    def setup_context(ctx, inputs, output):
        q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.extra = tuple(extra_args())
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        mask = ()
        if input_mask:
            seq_grads, prefix_grads = any(ctx.needs_input_grad[0:3]), any(ctx.needs_input_grad[3:5])
            mask = (seq_grads, prefix_grads)
        grads = backward_op(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                            key_padding_mask, out, lse, ctx.causal, ctx.scale, *ctx.extra, *mask)
        if input_mask:
            grads = (*(grads[:3] if seq_grads else (None,) * 3), *(grads[3:] if prefix_grads else (None,) * 2))
        return (*grads, None, None, None, None, None)

    return backward, setup_context
