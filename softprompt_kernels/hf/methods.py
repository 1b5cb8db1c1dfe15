"""The method table: every PEFT type ``accelerate()`` takes and what accelerating it means (docs/DESIGN.md section 8).

One row per PEFT type (``METHODS``). ``accelerate()``, the forwards and ``generate`` look the active adapter's row
up once (``method_of``) and read it instead of switching on the type's name. A row says:

- how the adapter becomes the text pass's ``SoftPromptContext`` (``text_prompt``), with the logits of the prompt
  positions where the shared-prompt reformulation's loss needs them: a per-layer K/V prefix read as it is
  (decoders and encoders), or a prompt run once through a causal decoder (section 3);
- on encoders, the prompts inserted into the layer-0 input (``encoder_prompts``), or why encoders are refused;
- its loss (None: the model's own, from the labels);
- whether a sharded model may run its prompt packed with the text, and whether rows may name adapters.

``generate`` is the same hook for every prompt-learning row: the row's context, computed once without logits, and
text positions from k. ADAPTION_PROMPT is not prompt learning: its row hands everything to its own module
(``hf/adaption_prompt.py``: unsupported_reason, accelerate, restore; its generate numbers positions itself).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from . import adaption_prompt, compat, losses
from .attention import SoftPromptContext
from .multi_prompt import build_bank
from .prompts import (check_task_ids, context_for, multitask_prompts, prefix_tuning_layers, prompt_embeddings,
                      run_prompt_once, task_prompts)

DECODER_TASKS = ("CAUSAL_LM",)
ENCODER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")


@dataclass
class Prompt:
    """An adapter made ready for one text pass."""

    context: SoftPromptContext
    lengths: Union[int, torch.Tensor]             # k, or each row's [B] (0: no prompt): text positions start there
    first_logits: Optional[torch.Tensor] = None   # [1 | B, V] the last prompt position's (with labels)
    prompt_logits: Optional[torch.Tensor] = None  # [k, V] every prompt position's (CPT's loss)
    has_prompt: Optional[torch.Tensor] = None     # [B] bool, rows that have a prompt (None: all)


# text_prompt(peft_model, model, task_ids, batch, device, want_logits) -> Prompt
TextPrompt = Callable[..., Prompt]
# encoder_prompts(peft_model, model, task_ids, batch, device) -> (prompts [T, k, hidden], row's index [B] or None)
EncoderPrompts = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]
# loss(prompt, text_logits, labels, num_items_in_batch, input_type_mask, config) -> scalar
Loss = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Method:
    """How one prompt-learning PEFT type runs on the fused kernels (a row of ``METHODS``)."""

    # True: a per-layer K/V prefix the text pass reads as it is; False: a prompt that decoders run through the model
    # first and encoders insert. It picks the forward accelerate() installs.
    kv_prefix: bool
    text_prompt: TextPrompt
    encoder_prompts: Optional[EncoderPrompts] = None  # prompt methods on encoders: inserted into layer 0
    loss: Optional[Loss] = None  # None: the model's own loss (the labels go to the model)
    packs_when_sharded: bool = False  # one shared prompt: a sharded model may run it as row 0 of the text batch
    adapter_names_refusal: Optional[str] = None  # why rows cannot name adapters (None: they can)
    encoder_refusal: Optional[str] = None  # why encoders are refused ({model_type} filled in; None: they are not)

    def check_adapter_names(self, adapter_names) -> None:
        if adapter_names is not None and self.adapter_names_refusal is not None:
            raise ValueError(self.adapter_names_refusal)


@dataclass(frozen=True)
class OwnModule:
    """A PEFT type accelerated by a module of its own (``unsupported_reason``, ``accelerate``, ``restore``) that
    replaces the forward of PEFT's modules rather than the PeftModel's."""

    module: ModuleType


# --- how each method's adapter becomes the text pass's context


def _kv_prefix(peft_model, model, task_ids, batch, device, want_logits) -> Prompt:
    """PREFIX_TUNING, CARTRIDGE: the encoder's output viewed as each layer's prefix; no prompt positions to predict
    from (the model's own loss)."""
    return Prompt(context_for(prefix_tuning_layers(peft_model)), compat.active_config(peft_model).num_virtual_tokens)


def _prompt_once(peft_model, model, task_ids, batch, device, want_logits, all_logits=False) -> Prompt:
    """PROMPT_TUNING, P_TUNING, CPT: the prompt run once (batch 1); its per-layer K/V is every row's prefix."""
    prompt_pass = run_prompt_once(model, prompt_embeddings(peft_model, model), want_logits=want_logits,
                                  all_logits=all_logits and want_logits)
    return Prompt(context_for(prompt_pass.layers), compat.active_config(peft_model).num_virtual_tokens,
                  prompt_pass.last_logits, prompt_pass.logits)


def _task_prompts(peft_model, model, task_ids, batch, device, want_logits) -> Prompt:
    """MULTITASK_PROMPT_TUNING: the batch's distinct tasks' prompts in one pass; rows pick theirs (``task_ids``)."""
    config = compat.active_config(peft_model)
    task_ids = check_task_ids(task_ids, batch, config.num_tasks, device)
    context, first_logits = multitask_prompts(peft_model, model, task_ids, want_logits=want_logits)
    return Prompt(context, config.num_virtual_tokens, first_logits)


def bank_prompt(peft_model, model, adapter_names, batch, device, want_logits) -> Prompt:
    """Rows naming adapters (``adapter_names`` [B], None: the bare model): one bank, each row its own prefix."""
    bank = build_bank(peft_model, model, adapter_names, batch, device, want_logits=want_logits)
    return Prompt(bank.context, bank.row_lengths, bank.first_logits, has_prompt=bank.row_lengths > 0)


def num_adapters(context: SoftPromptContext) -> int:
    """How many prompts a bank context holds (0: every row is the bare model's)."""
    return len(context.prefix_lens) if context.prefix_lens is not None else 0


# --- encoders: the prompts inserted into the layer-0 input


def _shared_inserted(peft_model, model, task_ids, batch, device):
    return prompt_embeddings(peft_model, model), None  # [1, k, hidden]: every row's


def _task_inserted(peft_model, model, task_ids, batch, device):
    config = compat.active_config(peft_model)
    return task_prompts(peft_model, model, check_task_ids(task_ids, batch, config.num_tasks, device))


# --- losses


def _prompt_lm_loss(prompt, text_logits, labels, num_items_in_batch, input_type_mask, config):
    return losses.prompt_lm_loss(prompt.first_logits, text_logits, labels, num_items_in_batch, prompt.has_prompt)


def _cpt_loss(prompt, text_logits, labels, num_items_in_batch, input_type_mask, config):
    return losses.cpt_loss(prompt.prompt_logits, text_logits, labels, input_type_mask, config)


# --- the table

KV_PREFIX = Method(kv_prefix=True, text_prompt=_kv_prefix)
SHARED_PROMPT = Method(kv_prefix=False, text_prompt=_prompt_once, encoder_prompts=_shared_inserted,
                       loss=_prompt_lm_loss, packs_when_sharded=True)
TASK_PROMPTS = Method(
    kv_prefix=False, text_prompt=_task_prompts, encoder_prompts=_task_inserted, loss=_prompt_lm_loss,
    adapter_names_refusal="adapter_names does not apply to MULTITASK_PROMPT_TUNING adapters: pass task_ids (one task "
                          "per row) instead")
CONTEXT_PROMPT = Method(
    kv_prefix=False, text_prompt=functools.partial(_prompt_once, all_logits=True), loss=_cpt_loss,
    adapter_names_refusal="adapter_names is not supported with CPT adapters (their loss is CPT's own)",
    encoder_refusal="CPT on {model_type} (an encoder) is not supported: PEFT's CPT is for causal language models "
                    "only (its config takes task_type CAUSAL_LM alone)")

METHODS: Dict[str, Union[Method, OwnModule]] = {
    "PREFIX_TUNING": KV_PREFIX,
    "PROMPT_TUNING": SHARED_PROMPT,
    "P_TUNING": SHARED_PROMPT,
    "MULTITASK_PROMPT_TUNING": TASK_PROMPTS,
    "CARTRIDGE": KV_PREFIX,  # a prefix whose first slots are frozen: PEFT's forward treats it as PREFIX_TUNING
    "CPT": CONTEXT_PROMPT,   # prompt tuning on its context, with CPT's loss
    "ADAPTION_PROMPT": OwnModule(adaption_prompt),
}
SUPPORTED_METHODS = tuple(METHODS)


def method_of(config) -> Union[Method, OwnModule, None]:
    """The row of a PeftConfig's type (None: not in the table, or no config)."""
    return None if config is None else METHODS.get(compat.peft_type_name(config))


def refusal(method: Method, config, family) -> Optional[str]:
    """Why this prompt-learning method cannot run with this config's task on this family (None: it can)."""
    if method.encoder_refusal is not None and not family.causal:  # before the task check: this is the reason
        return method.encoder_refusal.format(model_type=family.model_type)
    task = compat.task_type_name(config)
    tasks = DECODER_TASKS if family.causal else ENCODER_TASKS
    if task not in tasks:
        kind = "causal decoders" if family.causal else "encoders"
        return f"task_type {task} on {family.model_type} is not supported; {kind} take {list(tasks)}"
    return None
