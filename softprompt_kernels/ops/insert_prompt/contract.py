"""The contract of ``insert_prompt`` (docs/DESIGN.md section 2): its arguments, written once.

``insert_prompt(input_ids, weight, prompt)`` is an encoder's layer-0 input with the prompt in front: ``[B, k + n, d]``
whose first ``k`` rows of every sequence are the soft prompt and whose rest is ``weight[input_ids]``. The public
function, the validated record, the compiled forward op's schema and its fake kernel derive from :data:`ARGS`.
The backward op ``insert_prompt_bwd(grad_out [B, L, d], k) -> grad_prompt [k, d]`` (the sum over rows of
``grad_out[:, :k]``, float32; float64 for float64) has its own two arguments.
"""
from __future__ import annotations

import torch

from ...common import accumulation_dtype
from ..contract import Arg, OpContract

ARGS = (
    Arg("input_ids", "Tensor", "[B, n] int32/int64 token ids (any strides), in [0, V)."),
    Arg("weight", "Tensor", "[V, d] the frozen embedding matrix; the output has its dtype."),
    Arg("prompt", "Tensor", "[k, d] (or [1, k, d]) the soft prompt, any floating dtype (cast to weight's on the way "
        "in; its gradient comes back in its own dtype, summed over rows in float32 (float64 for float64), "
        "deterministically).", grad="kernel"),
)
OPTIONS = (
    Arg("backend", "str", "'auto' (the first backend of the registry's priority table for the device that accepts "
        "the inputs; falling back to 'torch' where a fused kernel is listed warns once with PerformanceWarning), "
        "'torch', 'cpu' or 'cuda'.", default="auto"),
    Arg("validate", "bool", "check that every id lies in [0, V) with one min/max reduction, which on a GPU waits for "
        "the device. False skips that sync: an out-of-range id then gives a NaN row on CUDA (never an out-of-bounds "
        "read), a ValueError from the cpu kernel, and torch's own index error from the torch backend.",
        default=True),
)
CONTRACT = OpContract("insert_prompt", ARGS, outputs=("out",))
FORWARD_SCHEMA = CONTRACT.schema()
BACKWARD_SCHEMA = "(Tensor grad_out, SymInt k) -> Tensor"


class _Placement:
    device = property(lambda inputs: inputs.weight.device)


InsertPromptInputs = CONTRACT.inputs_class("InsertPromptInputs", _Placement)
InsertPromptInputs.__doc__ = "Validated arguments of one insert_prompt call (the prompt as [k, d])."


def forward_fake(*args, **kwargs):
    named = CONTRACT.named(args, kwargs)
    (B, n), weight = named["input_ids"].shape, named["weight"]
    return weight.new_empty((B, named["prompt"].shape[0] + n, weight.shape[1]))


def backward_fake(grad_out, k):
    return grad_out.new_empty((k, grad_out.shape[2]), dtype=accumulation_dtype(grad_out.dtype))
