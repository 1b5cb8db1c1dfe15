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

from . import compat
from .attention import SoftPromptContext

Prefix = Tuple[torch.Tensor, torch.Tensor]


def prompt_encoder_output(peft_model, adapter: Optional[str] = None) -> torch.Tensor:
    """What PEFT's ``get_prompt`` computes for one row: ``[k, width]`` (differentiable)."""
    config = compat.adapter_config(peft_model, adapter)
    encoder = compat.prompt_encoder(peft_model, adapter)
    weight = compat.prompt_encoder_weight(encoder)
    if config.inference_mode:
        return weight
    tokens = compat.prompt_tokens(peft_model, adapter)[: config.num_virtual_tokens]
    return encoder(tokens.to(weight.device)[None])[0]


def prefix_tuning_layers(peft_model, adapter: Optional[str] = None) -> List[Prefix]:
    """Each layer's (prefix_k, prefix_v) ``[1, Hkv, k, D]`` for a PREFIX_TUNING adapter."""
    config = compat.adapter_config(peft_model, adapter)
    out = prompt_encoder_output(peft_model, adapter)
    dtype = compat.base_model_dtype(peft_model)
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
    logits: Optional[torch.Tensor] = None  # [k, vocab], every prompt position's (all_logits=True: CPT's loss)


def run_prompt_once(model, prompts: torch.Tensor, want_logits: bool = True, all_logits: bool = False) -> PromptPass:
    """Runs ``prompts [1, k, hidden]`` through ``model`` (a causal LM on softprompt attention).

    Each attention layer records its K/V into the context (no KV cache involved, so it works with
    caching off and under activation checkpointing, which this short batch-1 pass does not need).
    """
    capture = SoftPromptContext.capturing(compat.text_config(model).num_hidden_layers)
    with compat.activation_checkpointing_disabled(model):
        out = model(inputs_embeds=prompts, use_cache=False, logits_to_keep=0 if all_logits else int(want_logits),
                    softprompt_context=capture)
    return PromptPass(list(capture.captured), out.logits[:, -1] if want_logits or all_logits else None,
                      out.logits[0] if all_logits else None)


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
    capture = SoftPromptContext.capturing(compat.text_config(model).num_hidden_layers)
    with compat.activation_checkpointing_disabled(model):
        out = model(inputs_embeds=stacked, use_cache=False, logits_to_keep=span if want_logits else 0,
                    softprompt_context=capture)
    last = None
    if want_logits:
        index = torch.tensor([k - 1 - (width - span) for k in lengths], device=out.logits.device)
        last = out.logits[torch.arange(len(prompts), device=out.logits.device), index]
    return PromptPass(list(capture.captured), last)


def check_task_ids(task_ids, batch: int, num_tasks: int, device) -> torch.Tensor:
    """``task_ids`` of a MULTITASK_PROMPT_TUNING forward as a long tensor [B] on ``device``; errors name it."""
    if task_ids is None:
        raise ValueError("task_ids is required for a MULTITASK_PROMPT_TUNING adapter: one task index per row")
    task_ids = torch.as_tensor(task_ids, device=device)
    if task_ids.dtype not in (torch.int32, torch.int64) or task_ids.shape != (batch,):
        raise ValueError(f"task_ids must be an integer tensor [B={batch}], got {tuple(task_ids.shape)} "
                         f"{task_ids.dtype}")
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(f"task_ids must lie in [0, num_tasks={num_tasks}), got {task_ids.tolist()}")
    return task_ids.long()


def task_prompts(peft_model, model, task_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MULTITASK_PROMPT_TUNING: (the batch's distinct tasks' prompts ``[T, k, hidden]`` in the model's embedding
    dtype, each row's index into them ``[B]``).

    Each distinct task's prompt comes from PEFT's encoder (the shared prompt times the task's low-rank factor),
    computed once per task, not once per row.
    """
    config = compat.adapter_config(peft_model)
    distinct, row_task = torch.unique(task_ids, return_inverse=True)
    encoder = compat.prompt_encoder(peft_model)
    tokens = compat.prompt_tokens(peft_model)[: config.num_virtual_tokens].to(distinct.device)
    prompts = encoder(tokens[None].expand(len(distinct), -1), distinct)  # [T, k, hidden]
    return prompts.to(model.get_input_embeddings().weight.dtype), row_task


def multitask_prompts(peft_model, model, task_ids: torch.Tensor, want_logits: bool):
    """MULTITASK_PROMPT_TUNING on a causal decoder: (context, first-token logits [B, vocab] or None).

    The distinct tasks' prompts (``task_prompts``) go through the model together (one batch-T pass) and each
    row attends to its task's through ``prompt_ids``: the shared-prompt reformulation, per task.
    """
    prompts, row_task = task_prompts(peft_model, model, task_ids)
    prompt_pass = run_prompts_together(model, list(prompts), want_logits)
    context = SoftPromptContext(layer_prefixes=prompt_pass.layers, prompt_ids=row_task)
    return context, (prompt_pass.last_logits[row_task] if want_logits else None)


def prompt_embeddings(peft_model, model, adapter: Optional[str] = None) -> torch.Tensor:
    """PROMPT_TUNING / P_TUNING prompt ``[1, k, hidden]`` in the model's embedding dtype."""
    prompts = prompt_encoder_output(peft_model, adapter)[None]
    return prompts.to(model.get_input_embeddings().weight.dtype)


def context_for(layers: List[Prefix]) -> SoftPromptContext:
    return SoftPromptContext(layer_prefixes=layers)
