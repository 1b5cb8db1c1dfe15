"""Batched generation where every row names its own prompt adapter.

Prefill runs the whole (left-padded) batch through ``prefix_attention`` with each row's ``prompt_ids``;
every decode step is the same op with one query (``Lq = 1``), so the KV cache holds only the text's K/V
and the prefixes stay once in the bank. A row's tokens are numbered from its adapter's length k by
counting its real tokens (padding is masked out and not counted), so a request gets the same tokens
whatever it is batched with: those of a greedy loop over PEFT's forward for that adapter on the request
alone.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from ..hf import compat
from ..hf.positions import text_positions


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
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


def _per_row(value, batch: int, name: str, device) -> torch.Tensor:
    values = value if isinstance(value, (list, tuple)) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {batch} rows")
    return torch.tensor([float(v) for v in values], device=device)


@torch.no_grad()
def generate(bank, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             adapters: Optional[Sequence[Optional[str]]] = None, max_new_tokens: Union[int, Sequence[int]] = 32,
             do_sample: bool = False, temperature: Union[float, Sequence[float]] = 1.0,
             top_p: Union[float, Sequence[float]] = 1.0, seed: Union[None, int, Sequence[Optional[int]]] = None,
             eos_token_id: Optional[int] = None, pad_token_id: int = 0,
             on_token: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> List[List[int]]:
    """New tokens of every row (a row stops after its EOS or its ``max_new_tokens``).

    ``on_token(tokens [B], active [B] bool)``, if given, is called as each step's tokens are chosen
    (streaming, per-token latency measurements).
    """
    model = bank.model
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, n], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = bank.device
    input_ids = input_ids.to(device)
    adapters = list(adapters) if adapters is not None else [None] * batch
    if len(adapters) != batch:
        raise ValueError(f"adapters has {len(adapters)} entries for a batch of {batch} rows")
    mask = (attention_mask.to(device).long() if attention_mask is not None
            else torch.ones_like(input_ids))
    limits = _per_row(max_new_tokens, batch, "max_new_tokens", device).long()
    temperatures = _per_row(temperature, batch, "temperature", device) if do_sample else torch.zeros(batch,
                                                                                                   device=device)
    top_ps = _per_row(top_p, batch, "top_p", device)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * batch
    generators = [torch.Generator().manual_seed(int(s) + (row if not isinstance(seed, (list, tuple)) else 0))
                  if s is not None else None for row, s in enumerate(seeds)]

    context, row_lengths = bank.context_for(adapters)
    cache = compat.new_dynamic_cache(model)
    positions = text_positions(bank.family, row_lengths, length, attention_mask=mask, count_real_tokens=True)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, softprompt_context=context, **{compat.cache_argument(model): cache})
    new = [[] for _ in range(batch)]
    finished = limits <= 0
    for step in range(int(limits.max()) if batch else 0):
        token = _sample(out.logits[:, -1], temperatures, top_ps, generators)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        chosen = token.tolist()  # one transfer per step, not one per row
        for row in (~finished).nonzero().flatten().tolist():
            new[row].append(chosen[row])
        if on_token is not None:
            on_token(token, ~finished)
        finished = finished | (limits <= step + 1)
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = text_positions(bank.family, row_lengths, 1, attention_mask=mask, count_real_tokens=True)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    softprompt_context=context, **{compat.cache_argument(model): cache})
    return new
