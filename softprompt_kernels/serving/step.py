"""The model steps of serving, shared by ``PromptBank.generate`` (a batch run to its end) and the engine (rows
joining and leaving a running batch): prefill, one decode step, sampling.

Prefill runs the left-padded batch through ``prefix_attention`` with each row's ``prompt_ids``; a decode step
is the same op with one query per row (``Lq = 1``), so the KV cache holds only the text's K/V and the prefixes
stay once in the bank. A row's tokens are numbered from its adapter's length k by counting its real tokens
(padding is masked out and not counted), so a request gets the same tokens whatever it is batched with: those
of a greedy loop over PEFT's forward for that adapter on the request alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..hf import compat
from ..hf.attention import SoftPromptContext
from ..hf.positions import text_positions


@dataclass
class Prefilled:
    """A prefilled batch: what its decode steps need."""

    logits: torch.Tensor           # [B, vocab] at each row's last position
    cache: object                  # the text's KV cache (transformers' DynamicCache)
    context: SoftPromptContext     # the rows' prefixes (from the bank)
    row_lengths: torch.Tensor      # [B] each row's prompt length (where its text positions start)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) ``[B, longest]`` of token lists, padded on the left."""
    length = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def extend_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask after one more (real) token in every row."""
    return torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


@torch.no_grad()
def prefill(bank, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            adapters: Sequence[Optional[str]]) -> Prefilled:
    """Runs ``input_ids [B, n]`` (left-padded) with each row's adapter (None: the bare model) into a new cache."""
    context, row_lengths = bank.context_for(adapters)
    cache = compat.new_dynamic_cache(bank.model)
    positions = text_positions(bank.family, row_lengths, input_ids.shape[1], attention_mask=attention_mask,
                               count_real_tokens=True)
    out = bank.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                     logits_to_keep=1, softprompt_context=context, **{compat.cache_argument(bank.model): cache})
    return Prefilled(out.logits[:, -1], cache, context, row_lengths)


@torch.no_grad()
def decode(bank, tokens: torch.Tensor, attention_mask: torch.Tensor, cache, context: SoftPromptContext,
           row_lengths: torch.Tensor) -> torch.Tensor:
    """One step: ``tokens [B]`` appended to ``cache``; ``attention_mask [B, L]`` already counts them. Returns
    the next logits ``[B, vocab]``."""
    positions = text_positions(bank.family, row_lengths, 1, attention_mask=attention_mask, count_real_tokens=True)
    out = bank.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                     use_cache=True, softprompt_context=context, **{compat.cache_argument(bank.model): cache})
    return out.logits[:, -1]


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row: greedy where temperature == 0, else nucleus sampling with the row's generator."""
    greedy = logits.argmax(-1)
    if bool((temperature <= 0).all()):
        return greedy
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p[:, None]  # the smallest set reaching top_p
    sorted_probs = sorted_probs * keep
    tokens = []
    for row in range(logits.shape[0]):
        if temperature[row] <= 0:
            tokens.append(greedy[row])
            continue
        pick = torch.multinomial(sorted_probs[row].cpu(), 1, generator=generators[row])
        tokens.append(order[row, pick.to(order.device)][0])
    return torch.stack(tokens)
