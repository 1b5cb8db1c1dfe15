"""Batches whose rows use different prompt adapters: one bank, ``prompt_ids`` per row.

``model(input_ids, ..., adapter_names=["a", "b", None, "a"])`` on an accelerated PEFT model that holds
several prompt-learning adapters of one kind: each distinct adapter's per-layer prefix is computed once
(prefix tuning: its encoder; prompt/P-tuning: the prompts of all of them in one batch-P pass), the prefixes
are padded to the longest and stacked into a bank ``[P, Hkv, K, D]`` per layer, and every row attends to its own
through ``prompt_ids`` and ``prefix_lens`` (``None``: the bare model for that row; the context is made by
hf/prefix_bank.py, as serving's is). Text positions of a row start at its adapter's length. Multi-task prompt training and prompt ensembling (one example
repeated with N adapters) are this call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import compat
from .attention import SoftPromptContext
from .prefix_bank import bank_context
from .prompts import prefix_tuning_layers, prompt_embeddings, run_prompts_together


@dataclass
class BatchPrefixes:
    """The prefixes of one multi-adapter forward call (not to be confused with serving's PromptBank)."""

    context: SoftPromptContext
    row_lengths: torch.Tensor             # [B] prompt length of each row (0 without a prompt)
    first_logits: Optional[torch.Tensor]  # [B, vocab] the last prompt position's logits per row (prompt methods)


def check_adapter_names(peft_model, adapter_names: Sequence[Optional[str]], batch: int) -> List[str]:
    """The distinct adapters, in order of first use; errors name what is wrong."""
    if len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")
    distinct = [name for name in dict.fromkeys(adapter_names) if name is not None]
    known = compat.adapter_names(peft_model)
    unknown = [name for name in distinct if name not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; this model has {sorted(known)}")
    kinds = {compat.peft_type_name(compat.adapter_config(peft_model, name)) for name in distinct}
    if len(kinds) > 1:
        raise ValueError(f"adapters of one batch must be of one kind, got {sorted(kinds)}")
    return distinct


def build_bank(peft_model, model, adapter_names: Sequence[Optional[str]], batch: int, device,
               want_logits: bool) -> BatchPrefixes:
    distinct = check_adapter_names(peft_model, adapter_names, batch)
    index = {name: i for i, name in enumerate(distinct)}
    slots = [index[name] if name is not None else -1 for name in adapter_names]
    layers = lengths = prompt_pass = None
    if distinct:
        lengths = torch.tensor([compat.adapter_config(peft_model, name).num_virtual_tokens for name in distinct],
                               device=device)
        if compat.is_kv_prefix(compat.adapter_config(peft_model, distinct[0])):
            width = int(lengths.max())
            per_adapter = [prefix_tuning_layers(peft_model, name) for name in distinct]
            layers = [(_stack([a[i][0] for a in per_adapter], width), _stack([a[i][1] for a in per_adapter], width))
                      for i in range(compat.text_config(model).num_hidden_layers)]
        else:
            prompts = [prompt_embeddings(peft_model, model, name)[0] for name in distinct]
            prompt_pass = run_prompts_together(model, prompts, want_logits)
            layers = prompt_pass.layers  # already [P, Hkv, width, D]
    context, row_lengths = bank_context(model, layers, lengths, slots, device)
    first = None
    if prompt_pass is not None and want_logits:
        first = prompt_pass.last_logits[context.prompt_ids.clamp(min=0)]
    return BatchPrefixes(context, row_lengths, first)


def _stack(prefixes, width: int) -> torch.Tensor:
    """[1, Hkv, k_a, D] each -> [P, Hkv, width, D] (zeros past each adapter's length; never read)."""
    return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[2])) for p in prefixes])
