"""Small helpers every module shares: one warn-once, the dtypes the ops take, one accumulation dtype."""
from __future__ import annotations

import warnings
from typing import Hashable, Type

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # floating tensors of the ops
INDEX_DTYPES = (torch.int32, torch.int64)  # index tensors of the ops (ids, lengths, offsets)

_warned: set = set()


def warn_once(key: Hashable, message: str, category: Type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    """Warns the first time ``key`` is seen in this process; never while torch.compile traces."""
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What reductions accumulate in (and lse / summed prompt gradients come back as): float64 for
    float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
