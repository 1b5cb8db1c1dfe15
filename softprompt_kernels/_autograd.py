"""Autograd of a prefix-attention forward op, shared by every backend's op pair.

A forward op ``(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal,
scale) -> (out, lse)`` is differentiated by its backward op ``(grad_out, grad_lse, q, k, v,
prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse, causal, scale, *extra)
-> (dq, dk, dv, dprefix_k, dprefix_v)``. The lse is differentiable; an unused output's gradient
arrives as None (no zeros are materialised for it).
"""
from typing import Callable, Tuple

import torch


def prefix_attention_autograd(backward_op: Callable, extra_args: Callable[[], Tuple] = tuple):
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
        grads = backward_op(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                            key_padding_mask, out, lse, ctx.causal, ctx.scale, *ctx.extra)
        return (*grads, None, None, None, None, None)

    return backward, setup_context
