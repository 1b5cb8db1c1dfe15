"""Prompt insertion for bidirectional encoders: ``[prompt; embedding(input_ids)]`` as one layer-0 input.

``insert_prompt(input_ids, weight, prompt)`` returns ``[B, k + n, d]`` whose first ``k`` rows of every
sequence are the soft prompt and whose rest is the embedding lookup of ``input_ids``. The prompt is
never expanded over the batch as a tensor of its own, and its gradient is the sum over rows.

Backends: ``torch`` (the reference below: one output buffer written in two slices), ``cpu`` and
``cuda`` (fused kernels of csrc/prompt_insertion_bindings.cpp: one pass writing every output row
straight from the prompt or the embedding matrix, no intermediate embedding tensor).
"""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F

from . import _insertion_ops
from ._validation import (INDEX_DTYPES, SUPPORTED_DTYPES, BackendNotSupportedError, InvalidArgumentError,
                          InvalidDtypeError)
from .backends import PerformanceWarning

BACKENDS = ("torch", "cpu", "cuda")


class _InsertPrompt(torch.autograd.Function):
    """The reference: readable, and what the fused kernels are tested against (with a float64 oracle)."""

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


def _check_tensor(value, name: str, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidDtypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    return value


def _check_args(input_ids, weight, prompt) -> torch.Tensor:
    """Shape, dtype and device checks (metadata only); returns the prompt as [k, d]."""
    input_ids = _check_tensor(input_ids, "input_ids", "[B, n]")
    weight = _check_tensor(weight, "weight", "[V, d]")
    prompt = _check_tensor(prompt, "prompt", "[k, d]")
    if input_ids.dim() != 2:
        raise InvalidArgumentError(f"input_ids must be a [B, n] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in INDEX_DTYPES:
        raise InvalidDtypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if weight.dim() != 2:
        raise InvalidArgumentError(f"weight must be the [V, d] embedding matrix, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise InvalidDtypeError(f"weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if prompt.dim() == 3 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.dim() != 2 or prompt.shape[1] != weight.shape[1]:
        raise InvalidArgumentError(
            f"prompt must have shape [k, d={weight.shape[1]}] or [1, k, d={weight.shape[1]}], got {tuple(prompt.shape)}")
    if prompt.dtype not in SUPPORTED_DTYPES:
        raise InvalidDtypeError(f"prompt must be float16, bfloat16, float32 or float64, got {prompt.dtype}")
    for name, t in (("input_ids", input_ids), ("prompt", prompt)):
        if t.device != weight.device:
            raise InvalidArgumentError(f"{name} must be on weight's device {weight.device}, got {t.device}")
    return prompt


def _check_id_range(input_ids: torch.Tensor, vocab: int) -> None:
    """One min/max reduction; on an accelerator reading it back waits for the device (validate=False skips it)."""
    if input_ids.numel() == 0:
        return
    message = f"input_ids must lie in [0, V={vocab}) (rows of weight)"
    if torch.compiler.is_compiling():  # no host read-back inside a graph: an asynchronous assertion instead
        torch._assert_async(((input_ids >= 0) & (input_ids < vocab)).all(), message)
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()
    if low < 0 or high >= vocab:
        raise InvalidArgumentError(f"{message}, got values in [{low}, {high}]")


def not_supported_reasons(backend: str, weight: torch.Tensor) -> List[str]:
    """Why ``backend`` cannot run an insertion with this (already validated) weight; empty when it can."""
    if backend == "torch":
        return []
    reasons = []
    why = _insertion_ops.unavailable_reason(backend)
    if why:
        reasons.append(why)
    if weight.device.type != backend:
        reasons.append(f"the {backend} backend needs {backend} tensors, got {weight.device}")
    if backend == "cuda" and weight.dtype == torch.float64:
        reasons.append("the cuda kernel has no float64 (weight is float64): use float32, bfloat16 or float16")
    return reasons


_warned: set = set()


def _select_backend(requested: str, weight: torch.Tensor) -> str:
    if requested not in ("auto", *BACKENDS):
        raise InvalidArgumentError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {requested!r}")
    if requested != "auto":
        reasons = not_supported_reasons(requested, weight)
        if reasons:
            raise BackendNotSupportedError(f"backend={requested!r} cannot run insert_prompt: " + "; ".join(reasons))
        return requested
    fused = weight.device.type
    if fused not in BACKENDS or _insertion_ops.unavailable_reason(fused) is not None:
        return "torch"  # no fused kernel for this device in this install: nothing to warn about
    reasons = not_supported_reasons(fused, weight)
    if not reasons:
        return fused
    key = (fused, tuple(reasons))
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(f"insert_prompt on {fused} falls back to the pure-PyTorch path ({'; '.join(reasons)})",
                      PerformanceWarning, stacklevel=3)
    return "torch"


def insert_prompt(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor, *, backend: str = "auto",
                  validate: bool = True) -> torch.Tensor:
    """``[B, k + n, d]`` in weight's dtype: the prompt ``[k, d]`` (or ``[1, k, d]``) in front of ``weight[input_ids]``.

    ``input_ids`` ``[B, n]`` int32/int64 (any strides), ``weight`` ``[V, d]``, ``prompt`` in any floating dtype (cast
    to weight's dtype on the way in; its gradient comes back in its own dtype, summed over rows in float32, or
    float64 for float64). ``backend``: "auto" (the fused kernel of the tensors' device when this install has one and
    it accepts the inputs, else "torch"; a fused kernel that exists but refuses warns with PerformanceWarning),
    "torch", "cpu" or "cuda". Bad arguments raise InvalidArgumentError / InvalidDtypeError naming the argument.

    ``validate=True`` checks that every id lies in [0, V) with one min/max reduction, which on a GPU waits for the
    device. ``validate=False`` skips that sync: an out-of-range id then gives a NaN row on CUDA (never an
    out-of-bounds read), a ValueError from the cpu kernel, and torch's own index error from the torch backend (a
    device-side assertion on CUDA).
    """
    prompt = _check_args(input_ids, weight, prompt)
    chosen = _select_backend(backend, weight)
    if validate:
        _check_id_range(input_ids, weight.shape[0])
    if chosen == "torch":
        return _InsertPrompt.apply(input_ids, weight, prompt)
    return torch.ops.softprompt_kernels.insert_prompt_fwd(input_ids, weight, prompt)
