"""Position ids of text that follows a soft prompt: the one numbering function of training and serving.

A row's text comes after its prompt's ``k`` positions (PEFT's convention, for prompt and prefix methods), so its
positions start at ``k``. How they continue is the family's (hf/families.py):

- ``"index"``: ``k + past + index`` in the (padded) sequence, PEFT's numbering; with ``count_real_tokens`` the
  real tokens are counted instead, so that left padding does not shift a row (serving: a request's tokens do not
  depend on what it is batched with);
- ``"mask_cumsum"`` (OPT): ``k + (real tokens up to here) - 1``, and -1 on padding;
- ``"padding_cumsum"`` (RoBERTa): ``pad_token_id + k + (real tokens up to here)``, and ``pad_token_id`` on padding.
"""
from __future__ import annotations

from typing import Optional, Union

import torch


def text_positions(family, prompt_lengths: Union[int, torch.Tensor], length: int, *,
                   attention_mask: Optional[torch.Tensor] = None, past: int = 0, batch: Optional[int] = None,
                   device=None, count_real_tokens: bool = False, pad_token_id: Optional[int] = None) -> torch.Tensor:
    """Positions ``[B, length]`` of the last ``length`` tokens of each row.

    ``prompt_lengths``: an int (one prompt) or ``[B]`` (each row's prompt length, 0 for none).
    ``attention_mask``: ``[B, past + length]`` 0/1 (None: every token is real); ``batch`` and ``device`` are
    needed only without one.
    """
    if attention_mask is not None:
        batch, device = attention_mask.shape[0], attention_mask.device
    k = prompt_lengths[:, None] if isinstance(prompt_lengths, torch.Tensor) else prompt_lengths
    if family.positions == "index" and not count_real_tokens:
        return (k + past + torch.arange(length, device=device)[None]).expand(batch, length)
    mask = (attention_mask.long() if attention_mask is not None
            else torch.ones(batch, past + length, dtype=torch.long, device=device))
    real_before = mask.cumsum(-1)  # real tokens up to and including each position
    if family.positions == "padding_cumsum":
        if pad_token_id is None:
            raise ValueError(f"{family.model_type} numbers positions from its padding index: pass pad_token_id")
        positions = (k + real_before) * mask + pad_token_id
    else:
        positions = k + (real_before - 1).clamp(min=0)
        if family.positions == "mask_cumsum":  # OPT numbers padding -1 (it is masked out either way)
            positions = torch.where(mask.bool(), positions, torch.full_like(positions, -1))
    return positions[:, -length:]
