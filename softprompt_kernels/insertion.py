"""Prompt insertion for bidirectional encoders: ``[prompt; embedding(input_ids)]`` as one layer-0 input.

``insert_prompt(input_ids, weight, prompt)`` returns ``[B, k + n, d]`` whose first ``k`` rows of every
sequence are the soft prompt and whose rest is the embedding lookup of ``input_ids``. The prompt is
never expanded over the batch as a tensor of its own, and its gradient is the sum over rows.
This is the reference implementation (one output buffer written in two slices); a fused CUDA kernel
is the subject of a later issue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import InvalidArgumentError, InvalidDtypeError


class _InsertPrompt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, prompt):
        B, n = input_ids.shape
        k, d = prompt.shape
        out = weight.new_empty((B, k + n, d))
        out[:, :k] = prompt.to(weight.dtype)  # broadcast write, no [B, k, d] prompt tensor
        out[:, k:] = F.embedding(input_ids, weight)
        ctx.save_for_backward(input_ids)
        ctx.k, ctx.num_weights, ctx.prompt_dtype = k, weight.shape[0], prompt.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (input_ids,) = ctx.saved_tensors
        k = ctx.k
        grad_weight = grad_prompt = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.embedding_backward(grad_out[:, k:], input_ids, ctx.num_weights, -1, False,
                                                           False)
        if ctx.needs_input_grad[2]:
            grad_prompt = grad_out[:, :k].sum(0).to(ctx.prompt_dtype)
        return None, grad_weight, grad_prompt


def insert_prompt(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """``[B, k + n, d]``: the prompt ``[k, d]`` (or ``[1, k, d]``) in front of ``weight[input_ids]``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InvalidArgumentError("input_ids must be a [B, n] tensor")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise InvalidDtypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if weight.dim() != 2:
        raise InvalidArgumentError(f"weight must be the [vocab, d] embedding matrix, got shape {tuple(weight.shape)}")
    if prompt.dim() == 3 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.dim() != 2 or prompt.shape[1] != weight.shape[1]:
        raise InvalidArgumentError(f"prompt must have shape [k, d={weight.shape[1]}], got {tuple(prompt.shape)}")
    if input_ids.device != weight.device or prompt.device != weight.device:
        raise InvalidArgumentError("input_ids, weight and prompt must be on one device")
    return _InsertPrompt.apply(input_ids, weight, prompt)
