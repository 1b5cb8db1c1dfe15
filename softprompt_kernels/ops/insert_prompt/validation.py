"""Argument checks of ``insert_prompt``: metadata only, except the optional id range check (one reduction)."""
from __future__ import annotations

import torch

from ...common import INDEX_DTYPES, SUPPORTED_DTYPES
from ...errors import InvalidArgumentError, InvalidDtypeError
from .contract import CONTRACT, InsertPromptInputs


def _check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        layout = CONTRACT.by_name[name].doc.split(" ", 1)[0]
        raise InvalidDtypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    return value


def validate(**arguments) -> InsertPromptInputs:
    """Shape, dtype and device checks; the prompt comes back as [k, d]."""
    args = CONTRACT.complete(arguments)
    input_ids, weight, prompt = (_check_tensor(args[name], name) for name in CONTRACT.by_name)
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
        raise InvalidArgumentError(f"prompt must have shape [k, d={weight.shape[1]}] or [1, k, d={weight.shape[1]}], "
                                   f"got {tuple(prompt.shape)}")
    if prompt.dtype not in SUPPORTED_DTYPES:
        raise InvalidDtypeError(f"prompt must be float16, bfloat16, float32 or float64, got {prompt.dtype}")
    for name, t in (("input_ids", input_ids), ("prompt", prompt)):
        if t.device != weight.device:
            raise InvalidArgumentError(f"{name} must be on weight's device {weight.device}, got {t.device}")
    return InsertPromptInputs(input_ids=input_ids, weight=weight, prompt=prompt)


def check_id_range(input_ids: torch.Tensor, vocab: int) -> None:
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
