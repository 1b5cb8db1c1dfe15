"""Autograd of a prefix-attention forward op, shared by every backend's op pair, wired by argument name.

A forward op ``(<the contract's kernel arguments>) -> (out, lse)`` is differentiated by its backward op
``(grad_out, grad_lse, out, lse, <the same arguments>, seq_grads, prefix_grads, *extra) -> (grad_q, grad_k,
grad_v, grad_prefix_k, grad_prefix_v)`` (contract.py). The lse is differentiable; an unused output's gradient
arrives as None (no zeros are materialised for it).

``seq_grads`` / ``prefix_grads`` come from autograd's ``needs_input_grad``: whether q, k or v, and whether
prefix_k or prefix_v, need a gradient (a frozen model's first layer: only the prefix does). The op skips the
others' work and returns them empty; they are passed on as None.

Attention sinks need nothing from the backward op: the forward's lse includes them, so the probabilities it
recomputes are the right ones. Their own gradient (the contract's ``grad="formula"``) is computed here, once for
every backend: ``d sink_h = -sum over rows and queries of exp(sink_h - lse) * (rowsum(dO * O) - dlse)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from ...common import accumulation_dtype
from ..contract import Arg
from .contract import BACKWARD_LEADING, BACKWARD_TRAILING, CONTRACT, KERNEL_GRADS, SEQUENCE_GRADS


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


FORMULA_GRADS = {"sinks": lambda args, grad_out, grad_lse: sinks_grad(args["sinks"], args["out"], args["lse"],
                                                                      grad_out, grad_lse)}
_KERNEL_ARGS = tuple(a.name for a in CONTRACT.kernel_args)
_TENSOR_ARGS = tuple(a.name for a in CONTRACT.kernel_args if a.type.startswith("Tensor"))
_OTHER_ARGS = tuple(a.name for a in CONTRACT.kernel_args if not a.type.startswith("Tensor"))


def register_prefix_attention_autograd(forward_op, backward_op: Callable, extra_args: Sequence[Arg] = (),
                                       extra_values: Callable[[], Mapping[str, object]] = dict) -> None:
    """Registers autograd on ``forward_op`` (a qualified name or a custom op). ``extra_args`` are the backward
    op's arguments after the contract's (Triton: ``deterministic``); ``extra_values()``, read at forward time,
    gives their values."""

    def setup_context(ctx, inputs, output):
        args = CONTRACT.named(inputs)
        ctx.save_for_backward(*(args[name] for name in _TENSOR_ARGS), *output)
        ctx.others = {name: args[name] for name in _OTHER_ARGS}
        ctx.extra = dict(extra_values())
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_lse):
        *tensors, out, lse = ctx.saved_tensors
        args: Dict[str, object] = {**dict(zip(_TENSOR_ARGS, tensors)), **ctx.others, "out": out, "lse": lse}
        wanted = dict(zip(_KERNEL_ARGS, ctx.needs_input_grad))  # trailing defaults may be left out
        seq_grads = any(wanted.get(name, False) for name in SEQUENCE_GRADS)
        prefix_grads = any(wanted.get(name, False) for name in KERNEL_GRADS if name not in SEQUENCE_GRADS)
        grads: Dict[str, Optional[torch.Tensor]] = {}
        if seq_grads or prefix_grads:
            values = {**args, "grad_out": grad_out if grad_out is not None else torch.zeros_like(out),
                      "grad_lse": grad_lse, "seq_grads": seq_grads, "prefix_grads": prefix_grads, **ctx.extra}
            computed = backward_op(*CONTRACT.positional(values, BACKWARD_LEADING, (*BACKWARD_TRAILING, *extra_args)))
            grads = {name: g for name, g in zip(KERNEL_GRADS, computed)
                     if (seq_grads if name in SEQUENCE_GRADS else prefix_grads)}
        for name, formula in FORMULA_GRADS.items():
            if wanted.get(name, False):
                grads[name] = formula(args, grad_out, grad_lse)
        return tuple(grads.get(name) for name in _KERNEL_ARGS[:len(ctx.needs_input_grad)])

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
