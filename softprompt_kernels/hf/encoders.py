"""Accelerated forwards of bidirectional encoders (BERT, RoBERTa): no prompt position is shared between rows there
(docs/DESIGN.md section 3), so prompt methods insert their prompts into the layer-0 input (fused) and prefix
methods hand every layer its prefix for non-causal ``prefix_attention``. What each method contributes comes from
its row of the method table (hf/methods.py)."""
from __future__ import annotations

import warnings

import torch

from ..ops import insert_prompts
from . import calls, compat
from .losses import token_classification_loss
from .methods import method_of
from .positions import text_positions

PER_TOKEN_TASKS = ("TOKEN_CLS",)  # logits per token: the prompt's positions are cut off so that labels [B, n] fit


def prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                   output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                   position_ids=None, adapter_names=None, **kwargs):
    """P-Tuning v2 (PREFIX_TUNING, CARTRIDGE) on an encoder: every layer's prefix into non-causal prefix_attention.

    ``position_ids`` given are PEFT's: offset by k, as the prefix's positions come first. ``adapter_names`` (rows
    naming adapters) is for causal decoders: given here it raises ValueError rather than being ignored."""
    _refuse_adapter_names(adapter_names)
    model = self.get_base_model()
    batch, length, device = calls.batch_and_length(input_ids, inputs_embeds)
    prompt = method_of(compat.active_config(self)).text_prompt(self, model, task_ids, batch, device, want_logits=False)
    k = prompt.lengths
    if position_ids is None:
        position_ids = text_positions(calls.family(self), k, length, attention_mask=attention_mask, batch=batch,
                                      device=device, pad_token_id=model.config.pad_token_id)
    else:
        position_ids = position_ids + k
    out = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                position_ids=position_ids, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, softprompt_context=prompt.context,
                **kwargs)
    return calls.as_requested(out, return_dict, model)


def prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                   output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                   position_ids=None, token_type_ids=None, adapter_names=None, **kwargs):
    """Prompt/P-tuning/multitask prompt tuning on an encoder: the prompt inserted into the layer-0 input, as PEFT
    does; with MULTITASK_PROMPT_TUNING each row gets its task's prompt (``task_ids`` [B]), one per distinct task.

    Token classification returns logits for the text tokens only, so that labels [B, n] line up. ``adapter_names``
    raises ValueError (rows naming adapters is for causal decoders).
    """
    _refuse_adapter_names(adapter_names)
    config = compat.active_config(self)
    model = self.get_base_model()
    k = config.num_virtual_tokens
    batch, length, device = calls.batch_and_length(input_ids, inputs_embeds)
    if position_ids is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
    prompts, row_prompt = method_of(config).encoder_prompts(self, model, task_ids, batch, device)
    inputs = _with_prompts(model, input_ids, inputs_embeds, prompts, row_prompt, batch)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1)
    if token_type_ids is not None:
        token_type_ids = torch.cat([token_type_ids.new_zeros(batch, k), token_type_ids], dim=1)
    per_token = compat.task_type_name(config) in PER_TOKEN_TASKS
    out = model(inputs_embeds=inputs, attention_mask=attention_mask, token_type_ids=token_type_ids,
                labels=None if per_token else labels, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
    if per_token:
        out.logits = out.logits[:, k:]
        if labels is not None:
            out = type(out)(loss=token_classification_loss(out.logits, labels), **out)
    return calls.as_requested(out, return_dict, model)


def _refuse_adapter_names(adapter_names) -> None:
    # it used to reach the base model and be ignored: every row then silently used the active adapter
    if adapter_names is not None:
        raise ValueError("adapter_names (one adapter per row) is supported on causal decoders; on encoders every row "
                         "uses the active adapter: call set_adapter() and run each adapter's rows separately")


def _with_prompts(model, input_ids, inputs_embeds, prompts, row_prompt, batch):
    """The layer-0 input [B, k + n, hidden]: each row's prompt (``prompts[row_prompt]``, or ``prompts[0]`` for every
    row) before its text."""
    if inputs_embeds is None:
        # validate=False: no device sync per step; a bad id still fails loudly (cpu: error, cuda: NaN row)
        return insert_prompts(input_ids, model.get_input_embeddings().weight, prompts, row_prompt, validate=False)
    rows = prompts.expand(batch, -1, -1) if row_prompt is None else prompts[row_prompt]
    return torch.cat([rows.to(inputs_embeds.dtype), inputs_embeds], dim=1)
