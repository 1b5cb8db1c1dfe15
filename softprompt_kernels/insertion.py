"""Prompt insertion for bidirectional encoders: ``[prompt; embedding(input_ids)]`` as one layer-0 input.

``insert_prompt(input_ids, weight, prompt)`` returns ``[B, k + n, d]`` whose first ``k`` rows of every
sequence are the soft prompt and whose rest is the embedding lookup of ``input_ids``; the prompt's
gradient is the sum over rows. ``insert_prompts(input_ids, weight, prompts, prompt_ids)`` gives each row its
own prompt of ``[P, k, d]`` (multitask prompt tuning): one ``insert_prompt`` call per distinct prompt.

Backends (the op ``insert_prompt`` of the one registry, softprompt_kernels/backends.py): ``torch``
(the reference below: PEFT's expand + cat, differentiated by autograd), ``cpu`` and ``cuda`` (fused
kernels of csrc/prompt_insertion_bindings.cpp: one pass writing every output row straight from the
prompt or the embedding matrix, no intermediate embedding tensor, the prompt never expanded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import _insertion_ops
from ._validation import INDEX_DTYPES, SUPPORTED_DTYPES, InvalidArgumentError, InvalidDtypeError
from .backends import Backend, check_backend_name, get_backend, needs_device, register_backend, select_backend

OP = "insert_prompt"


@dataclass(frozen=True)
class InsertPromptInputs:
    """Validated arguments of one insert_prompt call."""

    input_ids: torch.Tensor  # [B, n] int32/int64
    weight: torch.Tensor     # [V, d]
    prompt: torch.Tensor     # [k, d]

    @property
    def device(self) -> torch.device:
        return self.weight.device


def insert_prompt_reference(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """What PEFT computes: the prompt expanded over the batch, concatenated to the embedding lookup."""
    embeds = F.embedding(input_ids, weight)
    return torch.cat([prompt.to(weight.dtype).expand(input_ids.shape[0], -1, -1), embeds], dim=1)


class TorchInsertion(Backend):
    op = OP
    name = "torch"
    description = "pure PyTorch: expand + cat, what PEFT does (the reference)"

    def run(self, inputs):
        return insert_prompt_reference(inputs.input_ids, inputs.weight, inputs.prompt)


class FusedInsertion(Backend):
    """The C++ kernel of one device type (the dispatcher picks it from the tensors' device)."""

    op = OP

    def __init__(self, device_type: str):
        self.name = device_type
        self.description = f"fused {device_type} kernel: every output row written once, prompt never expanded"

    def unavailable_reason(self):
        return _insertion_ops.unavailable_reason(self.name)

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs) + needs_device(self, inputs, self.name)
        if self.name == "cuda" and inputs.weight.dtype == torch.float64:
            reasons.append("the cuda kernel has no float64 (weight is float64): use float32, bfloat16 or float16")
        return reasons

    def run(self, inputs):
        return torch.ops.softprompt_kernels.insert_prompt_fwd(inputs.input_ids, inputs.weight, inputs.prompt)


register_backend(TorchInsertion())
register_backend(FusedInsertion("cpu"))
register_backend(FusedInsertion("cuda"))


def _check_tensor(value, name: str, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidDtypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    return value


def validate_insert_prompt_args(input_ids, weight, prompt) -> InsertPromptInputs:
    """Shape, dtype and device checks (metadata only); the prompt comes back as [k, d]."""
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
    return InsertPromptInputs(input_ids, weight, prompt)


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


def not_supported_reasons(backend: str, input_ids, weight, prompt) -> List[str]:
    """Why ``backend`` cannot run this insertion (empty list: it can)."""
    return get_backend(backend, OP).not_supported_reasons(validate_insert_prompt_args(input_ids, weight, prompt))


def insert_prompt(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor, *, backend: str = "auto",
                  validate: bool = True) -> torch.Tensor:
    """``[B, k + n, d]`` in weight's dtype: the prompt ``[k, d]`` (or ``[1, k, d]``) in front of ``weight[input_ids]``.

    ``input_ids`` ``[B, n]`` int32/int64 (any strides), ``weight`` ``[V, d]``, ``prompt`` in any floating dtype (cast
    to weight's dtype on the way in; its gradient comes back in its own dtype; the fused kernels sum it over rows in
    float32, or float64 for float64, deterministically). ``backend``: "auto" (the first backend of the registry's
    priority table for the device that accepts the inputs; falling back to "torch" where a fused kernel is listed
    warns once with PerformanceWarning), "torch", "cpu" or "cuda". Bad arguments raise InvalidArgumentError /
    InvalidDtypeError naming the argument.

    ``validate=True`` checks that every id lies in [0, V) with one min/max reduction, which on a GPU waits for the
    device. ``validate=False`` skips that sync: an out-of-range id then gives a NaN row on CUDA (never an
    out-of-bounds read), a ValueError from the cpu kernel, and torch's own index error from the torch backend (a
    device-side assertion on CUDA).
    """
    check_backend_name(backend, OP)
    inputs = validate_insert_prompt_args(input_ids, weight, prompt)
    chosen = select_backend(OP, inputs, backend)
    if validate:
        _check_id_range(inputs.input_ids, inputs.weight.shape[0])
    return chosen.run(inputs)


def insert_prompts(input_ids: torch.Tensor, weight: torch.Tensor, prompts: torch.Tensor,
                   prompt_ids: Optional[torch.Tensor] = None, *, backend: str = "auto",
                   validate: bool = True) -> torch.Tensor:
    """``[B, k + n, d]``: row b holds ``prompts[prompt_ids[b]]`` in front of ``weight[input_ids[b]]``.

    ``prompts`` ``[P, k, d]``; ``prompt_ids`` ``[B]`` integer in [0, P), or None when P is 1 (as in
    ``prefix_attention``). Each distinct prompt of the batch is one ``insert_prompt`` call over its rows (each
    prompt's gradient summed over its own rows by the kernel, the prompts never expanded), the rows then put
    back in order by one gather; a batch of one prompt is one call and no gather. ``backend`` and ``validate``
    as for ``insert_prompt``.
    """
    prompts = _check_tensor(prompts, "prompts", "[P, k, d]")
    if prompts.dim() != 3:
        raise InvalidArgumentError(f"prompts must be a [P, k, d] tensor, got shape {tuple(prompts.shape)}")
    if prompt_ids is None:
        if prompts.shape[0] != 1:
            raise InvalidArgumentError(f"prompt_ids is required with P={prompts.shape[0]} prompts (None means P=1)")
        return insert_prompt(input_ids, weight, prompts[0], backend=backend, validate=validate)
    prompt_ids = _check_tensor(prompt_ids, "prompt_ids", "[B]")
    batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() >= 1 else None
    if prompt_ids.dtype not in INDEX_DTYPES or prompt_ids.dim() != 1 or prompt_ids.shape[0] != batch:
        raise InvalidArgumentError(f"prompt_ids must be an int32/int64 tensor [B={batch}] (one prompt per row of "
                                   f"input_ids), got shape {tuple(prompt_ids.shape)} {prompt_ids.dtype}")
    distinct, row_prompt = torch.unique(prompt_ids, return_inverse=True)  # sorted: one read-back
    if distinct.numel() and (int(distinct[0]) < 0 or int(distinct[-1]) >= prompts.shape[0]):
        raise InvalidArgumentError(f"prompt_ids must lie in [0, P={prompts.shape[0]}), got {prompt_ids.tolist()}")
    if distinct.numel() <= 1:  # one prompt (or no rows)
        first = prompts[distinct[0]] if distinct.numel() else prompts[0]
        return insert_prompt(input_ids, weight, first, backend=backend, validate=validate)
    order = torch.argsort(row_prompt, stable=True)  # the rows grouped by prompt, each group in row order
    counts = torch.bincount(row_prompt, minlength=distinct.numel()).tolist()
    parts = [insert_prompt(input_ids[rows], weight, prompts[p], backend=backend, validate=validate)
             for p, rows in zip(distinct.tolist(), order.split(counts))]
    return torch.cat(parts).index_select(0, torch.argsort(order))
