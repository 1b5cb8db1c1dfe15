"""The one path from a bank of prefixes to the attention context of a batch whose rows use different prompts.

A bank is per layer ``(keys, values)`` of shape ``[P, Hkv, K, D]`` (slot ``p`` holds a prompt of ``lengths[p]``
positions, zeros past them) and each row names its slot (-1: no prompt). Training's multi-adapter forward
(hf/multi_prompt.py: one slot per distinct adapter of the batch) and serving's ``PromptBank`` (the slots of its
resident device bank) both build their context here, so that ``prompt_ids``, ``prefix_lens``, the rows' prompt
lengths (where their text positions start) and the empty bank are made in one way.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import compat
from .attention import SoftPromptContext

Prefix = Tuple[torch.Tensor, torch.Tensor]


def empty_layers(model, device) -> List[Prefix]:
    """A bank without slots, per layer: ``[0, Hkv, 0, D]`` (every row then attends to its text alone)."""
    config = compat.text_config(model)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    empty = torch.zeros((0, heads, 0, head_dim), device=device, dtype=model.dtype)
    return [(empty, empty)] * config.num_hidden_layers


def bank_context(model, layers: Optional[Sequence[Prefix]], lengths: Optional[torch.Tensor],
                 slots: Union[Sequence[int], torch.Tensor], device, *,
                 prefix_after_padding: bool = False) -> Tuple[SoftPromptContext, torch.Tensor]:
    """(context, prompt length of each row ``[B]``) for rows reading ``slots`` of a bank.

    ``layers``/``lengths`` None: the bank is empty (``model`` gives the shape of its empty prefixes), and every
    slot must be -1. ``prefix_after_padding``: see ``SoftPromptContext`` (serving: True, so that a left-padded
    row sees the sliding window it would see alone).
    """
    prompt_ids = torch.as_tensor(slots, dtype=torch.long, device=device)
    if layers is None:
        if bool((prompt_ids >= 0).any()):
            raise ValueError("rows name prompt slots of an empty bank")
        layers, lengths = empty_layers(model, device), None
        row_lengths = torch.zeros_like(prompt_ids)
    else:
        row_lengths = torch.where(prompt_ids >= 0, lengths[prompt_ids.clamp(min=0)], 0)
    context = SoftPromptContext(layer_prefixes=layers, prompt_ids=prompt_ids, prefix_lens=lengths,
                                prefix_after_padding=prefix_after_padding)
    return context, row_lengths
