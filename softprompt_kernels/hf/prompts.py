"""Per-layer prefixes from a PEFT prompt-learning adapter, computed once per batch (never per row).

- Prefix tuning / P-Tuning v2: the prompt encoder's output ``[k, layers * 2 * Hkv * D]`` is viewed
  as each layer's ``(prefix_k, prefix_v)`` ``[1, Hkv, k, D]`` (views of one tensor, no copies).
- Prompt tuning / P-Tuning on a causal decoder (docs/DESIGN.md section 3): the ``k`` prompt embeddings
  run once through the frozen model (batch 1); each layer's cached K/V is that layer's prefix, and
  the last prompt position's logits predict every row's first text token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import _compat
from .attention import SoftPromptContext

Prefix = Tuple[torch.Tensor, torch.Tensor]


def prompt_encoder_output(peft_model, adapter: Optional[str] = None) -> torch.Tensor:
    """What PEFT's ``get_prompt`` computes for one row: ``[k, width]`` (differentiable)."""
    config = _compat.adapter_config(peft_model, adapter)
    encoder = _compat.prompt_encoder(peft_model, adapter)
    weight = _compat.prompt_encoder_weight(encoder)
    if config.inference_mode:
        return weight
    tokens = _compat.prompt_tokens(peft_model, adapter)[: config.num_virtual_tokens]
    return encoder(tokens.to(weight.device)[None])[0]


def prefix_tuning_layers(peft_model, adapter: Optional[str] = None) -> List[Prefix]:
    """Each layer's (prefix_k, prefix_v) ``[1, Hkv, k, D]`` for a PREFIX_TUNING adapter."""
    config = _compat.adapter_config(peft_model, adapter)
    out = prompt_encoder_output(peft_model, adapter)
    dtype = _compat.base_model_dtype(peft_model)
    if dtype is not None:
        out = out.to(dtype)
    k, heads = config.num_virtual_tokens, config.num_attention_heads
    head_dim = config.token_dim // heads
    per_layer = out.view(k, config.num_layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # [2L, Hkv, k, D]
    return [(per_layer[2 * i][None], per_layer[2 * i + 1][None]) for i in range(config.num_layers)]


@dataclass
class PromptPass:
    """The prompt run once through a causal decoder: per-layer K/V and the last position's logits."""

    layers: List[Prefix]
    last_logits: Optional[torch.Tensor]  # [1, vocab]


def run_prompt_once(model, prompts: torch.Tensor, want_logits: bool = True) -> PromptPass:
    """Runs ``prompts [1, k, hidden]`` through ``model`` (a causal LM on softprompt attention).

    Each attention layer records its K/V into the context (no KV cache involved, so it works with
    caching off and under activation checkpointing, which this short batch-1 pass does not need).
    """
    capture = SoftPromptContext.capturing(_compat.text_config(model).num_hidden_layers)
    with _compat.activation_checkpointing_disabled(model):
        out = model(inputs_embeds=prompts, use_cache=False, logits_to_keep=1 if want_logits else 0,
                    softprompt_context=capture)
    return PromptPass(list(capture.captured), out.logits[:, -1] if want_logits else None)


def run_prompts_together(model, prompts: Sequence[torch.Tensor], want_logits: bool = True) -> PromptPass:
    """Several prompts ``[k_a, hidden]`` in one pass (batch P): per layer the bank ``[P, Hkv, max k, D]``, and
    each prompt's last-position logits ``[P, vocab]``.

    Shorter prompts are padded at the end by repeating their last embedding: causal attention keeps the
    padding out of every real position (whose K/V and logits are those of the prompt's own batch-1 pass),
    and the padded slots hold finite values that ``prefix_lens`` keeps the op from reading.
    """
    lengths = [p.shape[0] for p in prompts]
    width = max(lengths)
    stacked = torch.stack([torch.cat([p, p[-1:].expand(width - p.shape[0], -1)]) for p in prompts])
    span = width - min(lengths) + 1  # the logits from the shortest prompt's last position on
    capture = SoftPromptContext.capturing(_compat.text_config(model).num_hidden_layers)
    with _compat.activation_checkpointing_disabled(model):
        out = model(inputs_embeds=stacked, use_cache=False, logits_to_keep=span if want_logits else 0,
                    softprompt_context=capture)
    last = None
    if want_logits:
        index = torch.tensor([k - 1 - (width - span) for k in lengths], device=out.logits.device)
        last = out.logits[torch.arange(len(prompts), device=out.logits.device), index]
    return PromptPass(list(capture.captured), last)


def prompt_embeddings(peft_model, model, adapter: Optional[str] = None) -> torch.Tensor:
    """PROMPT_TUNING / P_TUNING prompt ``[1, k, hidden]`` in the model's embedding dtype."""
    prompts = prompt_encoder_output(peft_model, adapter)[None]
    return prompts.to(model.get_input_embeddings().weight.dtype)


def context_for(layers: List[Prefix]) -> SoftPromptContext:
    return SoftPromptContext(layer_prefixes=layers)
