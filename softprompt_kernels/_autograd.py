"""Autograd of a prefix-attention forward op, shared by every backend's op pair.

A forward op ``(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal,
scale, window, softcap, sinks, prefix_offsets) -> (out, lse)`` is differentiated by its backward op
``(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out,
lse, causal, scale, *extra, seq_grads, prefix_grads, window, softcap, prefix_offsets) -> (dq, dk, dv,
dprefix_k, dprefix_v)``.
The lse is differentiable; an unused output's gradient arrives as None (no zeros are materialised
for it).

``seq_grads`` / ``prefix_grads`` come from autograd's ``needs_input_grad``: whether q, k or v, and
whether prefix_k or prefix_v, need a gradient (a frozen model's first layer: only the prefix does).
The op skips the others' work and returns them empty; they are passed on as None.

Attention sinks need nothing from the backward op: the forward's lse includes them, so the
probabilities it recomputes are the right ones. Their own gradient is computed here, once for every
backend: ``d sink_h = -sum over rows and queries of exp(sink_h - lse) * (rowsum(dO * O) - dlse)``.
"""
from typing import Callable, Optional, Tuple

import torch

from ._common import accumulation_dtype


def sinks_grad(sinks: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: Optional[torch.Tensor],
               grad_lse: Optional[torch.Tensor]) -> torch.Tensor:
    """d loss / d sinks [Hq]: each sink is one more logit (with no value) in every softmax of its head."""
    acc = accumulation_dtype(out.dtype)
    delta = torch.zeros_like(lse, dtype=acc)
    if grad_out is not None:
        delta = delta + (grad_out.to(acc) * out.to(acc)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    sink_probability = torch.exp(sinks.to(acc)[None, :, None] - lse.to(acc))  # [B, Hq, Lq]
    return (-(sink_probability * delta)).sum((0, 2)).to(sinks.dtype)


def prefix_attention_autograd(backward_op: Callable, extra_args: Callable[[], Tuple] = tuple):
    """(backward, setup_context) for ``register_autograd``; ``extra_args()`` is read at forward time."""

    def setup_context(ctx, inputs, output):
        (q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, causal, scale, window, softcap,
         sinks, prefix_offsets) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse, sinks,
                              prefix_offsets)
        ctx.causal, ctx.scale, ctx.window, ctx.softcap = causal, scale, window, softcap
        ctx.extra = tuple(extra_args())
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_lse):
        (q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask, out, lse, sinks,
         prefix_offsets) = ctx.saved_tensors
        seq_grads, prefix_grads = any(ctx.needs_input_grad[0:3]), any(ctx.needs_input_grad[3:5])
        grads = (None,) * 5
        if seq_grads or prefix_grads:
            dout = grad_out if grad_out is not None else torch.zeros_like(out)
            grads = backward_op(dout, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                                key_padding_mask, out, lse, ctx.causal, ctx.scale, *ctx.extra, seq_grads,
                                prefix_grads, ctx.window, ctx.softcap, prefix_offsets)
            grads = (*(grads[:3] if seq_grads else (None,) * 3), *(grads[3:] if prefix_grads else (None,) * 2))
        # The dispatcher drops trailing arguments left at their defaults (window, softcap, sinks, prefix_offsets =
        # None): there is one gradient per argument passed, and sinks were passed only if needs_input_grad has them.
        passed = len(ctx.needs_input_grad)
        dsinks = sinks_grad(sinks, out, lse, grad_out, grad_lse) if passed > 12 and ctx.needs_input_grad[12] else None
        return (*grads, None, None, None, None, None, None, None, dsinks, None)[:passed]

    return backward, setup_context
