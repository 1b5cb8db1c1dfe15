"""The public ``insert_prompt`` op: ``[prompt; embedding(input_ids)]`` as one layer-0 input (encoders).

``insert_prompt(input_ids, weight, prompt)`` returns ``[B, k + n, d]`` whose first ``k`` rows of every sequence are
the soft prompt and whose rest is the embedding lookup of ``input_ids``; the prompt's gradient is the sum over
rows. ``insert_prompts(input_ids, weight, prompts, prompt_ids)`` gives each row its own prompt of ``[P, k, d]``
(multitask prompt tuning): one ``insert_prompt`` call per distinct prompt.

One package holds the op: contract.py (its arguments, written once), validation.py, reference.py (the ``torch``
backend: PEFT's expand + cat) and fused.py (the C++ op pair: the ``cpu`` and ``cuda`` backends), each backend
registered with the one registry (ops/backends.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ...common import INDEX_DTYPES
from ...errors import InvalidArgumentError, InvalidDtypeError
from ..backends import check_backend_name, get_backend, select_backend
from . import fused, reference, validation  # noqa: F401  (fused and reference register their backends)
from .contract import CONTRACT, OPTIONS, InsertPromptInputs
from .validation import validate

__all__ = ["insert_prompt", "insert_prompts", "not_supported_reasons", "validate", "InsertPromptInputs"]
OP = "insert_prompt"


def not_supported_reasons(backend: str, input_ids, weight, prompt) -> List[str]:
    """Why ``backend`` cannot run this insertion (empty list: it can)."""
    return get_backend(backend, OP).not_supported_reasons(validate(input_ids=input_ids, weight=weight, prompt=prompt))


def _insert_prompt(backend: str, validate: bool, **arguments) -> torch.Tensor:  # noqa: F811 (the option)
    check_backend_name(backend, OP)
    inputs = validation.validate(**arguments)
    chosen = select_backend(OP, inputs, backend)
    if validate:
        validation.check_id_range(inputs.input_ids, inputs.weight.shape[0])
    return chosen.run(inputs)


insert_prompt = CONTRACT.public_function(
    _insert_prompt, OPTIONS, module=__name__,
    doc="""``[B, k + n, d]`` in weight's dtype: the prompt ``[k, d]`` (or ``[1, k, d]``) in front of
    ``weight[input_ids]``.

    Bad arguments raise InvalidArgumentError / InvalidDtypeError naming the argument.""")


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
    if not isinstance(prompts, torch.Tensor):
        raise InvalidDtypeError(f"prompts must be a torch.Tensor of shape [P, k, d], got {type(prompts).__name__}")
    if prompts.dim() != 3:
        raise InvalidArgumentError(f"prompts must be a [P, k, d] tensor, got shape {tuple(prompts.shape)}")
    if prompt_ids is None:
        if prompts.shape[0] != 1:
            raise InvalidArgumentError(f"prompt_ids is required with P={prompts.shape[0]} prompts (None means P=1)")
        return insert_prompt(input_ids, weight, prompts[0], backend=backend, validate=validate)
    if not isinstance(prompt_ids, torch.Tensor):
        raise InvalidDtypeError(f"prompt_ids must be a torch.Tensor of shape [B], got {type(prompt_ids).__name__}")
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
