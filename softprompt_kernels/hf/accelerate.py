"""``accelerate(peft_model)`` / ``restore(peft_model)``: PEFT prompt learning on fused kernels, in place.

The PEFT model keeps its modules and parameter objects (optimizers made before keep working, PEFT's
``save_pretrained``/``from_pretrained`` are untouched); its ``forward`` and ``generate`` are replaced
on the instance and its base model switches to softprompt attention. ``restore`` undoes all three.

Causal decoders (docs/DESIGN.md section 3, exact):
- PREFIX_TUNING: each layer's prefix goes straight into ``prefix_attention``; never expanded over the
  batch, never concatenated, never in the KV cache.
- PROMPT_TUNING / P_TUNING: the prompt runs once per call through the frozen model (batch 1); its
  per-layer K/V is the prefix; the last prompt position's logits give every row's first-token loss.
Text positions start at k (PEFT's convention); ``logits`` cover the text positions only.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ..insertion import insert_prompts
from . import compat, adaption_prompt
from .attention import SoftPromptContext, use_softprompt_attention
from .families import family_of
from .losses import adapter_lm_losses, cpt_loss, prompt_lm_loss, token_classification_loss
from .multi_prompt import build_bank
from .positions import text_positions
from .prompts import (check_task_ids, context_for, multitask_prompts, prefix_tuning_layers, prompt_embeddings,
                      run_prompt_once, task_prompts)
from .sharding import is_sharded

SUPPORTED_METHODS = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CARTRIDGE", "CPT",
                     "ADAPTION_PROMPT")
MULTITASK = "MULTITASK_PROMPT_TUNING"
DECODER_TASKS = ("CAUSAL_LM",)
ENCODER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")
_STATE = "_softprompt_state"


class AccelerationError(ValueError):
    """The PEFT model cannot be accelerated (method, task or family), with the reason."""


def accelerate(peft_model):
    """Accelerates a PEFT prompt-learning model in place and returns it."""
    if getattr(peft_model, _STATE, None) is not None:
        return peft_model
    config = compat.active_config(peft_model)
    if config is not None and compat.is_adaption_prompt(config):  # not prompt learning: its own module
        reason = adaption_prompt.unsupported_reason(peft_model)
        if reason is not None:
            raise AccelerationError(reason)
        adaption_prompt.accelerate(peft_model)
        setattr(peft_model, _STATE, {"adaption_prompt": True})
        return peft_model
    if config is None or not getattr(config, "is_prompt_learning", False):
        raise AccelerationError("accelerate() takes a PEFT model whose active adapter is PROMPT_TUNING, P_TUNING or "
                                f"PREFIX_TUNING; got {type(peft_model).__name__}")
    method = compat.peft_type_name(config)
    if method not in SUPPORTED_METHODS:
        raise AccelerationError(f"peft_type {method} is not supported; supported: {list(SUPPORTED_METHODS)}")
    model = peft_model.get_base_model()
    family = family_of(model.config, model)
    if method == "CPT" and not family.causal:  # before the task check: this is the reason
        raise AccelerationError(f"CPT on {family.model_type} (an encoder) is not supported: PEFT's CPT is for causal "
                                "language models only (its config takes task_type CAUSAL_LM alone)")
    task = compat.task_type_name(config)
    tasks = DECODER_TASKS if family.causal else ENCODER_TASKS
    if task not in tasks:
        kind = "causal decoders" if family.causal else "encoders"
        raise AccelerationError(f"task_type {task} on {family.model_type} is not supported; {kind} take {list(tasks)}")
    previous_attention = use_softprompt_attention(model)
    if family.causal:
        forward = _prefix_forward if compat.is_kv_prefix(config) else _prompt_forward
    else:
        forward = _encoder_prefix_forward if compat.is_kv_prefix(config) else _encoder_prompt_forward
    # partials, not bound methods: they pickle (torch.save of the whole model) and keep the signature
    # (Trainer reads forward's parameters to pick dataset columns)
    state = {"attention": previous_attention, "family": family, "forward": functools.partial(forward, peft_model)}
    setattr(peft_model, _STATE, state)
    peft_model.forward = state["forward"]
    if family.causal:
        peft_model.generate = functools.partial(_generate, peft_model)
    return peft_model


def restore(peft_model):
    """Undoes ``accelerate``; returns the model."""
    state = getattr(peft_model, _STATE, None)
    if state is None:
        return peft_model
    if state.get("adaption_prompt"):
        adaption_prompt.restore(peft_model)
        delattr(peft_model, _STATE)
        return peft_model
    for name in ("forward", "generate"):
        peft_model.__dict__.pop(name, None)
    compat.set_attention_implementation(peft_model.get_base_model(), state["attention"])
    delattr(peft_model, _STATE)
    return peft_model


def is_accelerated(peft_model) -> bool:
    return getattr(peft_model, _STATE, None) is not None


def _family(peft_model):
    """The family accelerate() found (checked once there, not on every forward)."""
    return getattr(peft_model, _STATE)["family"]


def _adapter_disabled(peft_model) -> bool:
    """Inside PEFT's ``with model.disable_adapter():`` PEFT swaps the model's forward for the base model's."""
    return peft_model.__dict__.get("forward") is not getattr(peft_model, _STATE)["forward"]


def _as_requested(out, return_dict, model):
    """The output as a ModelOutput or, with return_dict=False (or the config's use_return_dict off), a tuple."""
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _check_mask(attention_mask, length: int, past: int) -> None:
    if attention_mask is not None and attention_mask.shape[-1] != past + length:
        raise ValueError(f"attention_mask must cover the {past} cached and {length} new tokens ([B, {past + length}]), "
                         f"got shape {tuple(attention_mask.shape)}")


# --- positions and cache arguments


def _batch_and_length(input_ids, inputs_embeds):
    x = input_ids if input_ids is not None else inputs_embeds
    if x is None:
        raise ValueError("pass input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


# --- forward


def _prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                    position_ids=None, **kwargs):
    model = self.get_base_model()
    batch, length, device = _batch_and_length(input_ids, inputs_embeds)
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None:
        bank = build_bank(self, model, adapter_names, batch, device, want_logits=False)
        k, context = bank.row_lengths, bank.context
    else:
        k = compat.active_config(self).num_virtual_tokens
        context = context_for(prefix_tuning_layers(self))
    cache = compat.pop_cache(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    _check_mask(attention_mask, length, past)
    if position_ids is None:
        position_ids = text_positions(_family(self), k, length, attention_mask=attention_mask, past=past, batch=batch, device=device)
    else:
        position_ids = position_ids + (k[:, None] if isinstance(k, torch.Tensor) else k)  # PEFT's offset
    if cache is not None:
        kwargs[compat.cache_argument(model)] = cache
    per_adapter = adapter_names is not None and labels is not None
    out = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                labels=None if per_adapter else labels, position_ids=position_ids, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, softprompt_context=context, **kwargs)
    if per_adapter:  # the model's loss (labels shifted inside), and each adapter's share of it
        num_items = kwargs.get("num_items_in_batch")
        loss, adapter_losses = adapter_lm_losses(None, out.logits, labels, num_items, None, context.prompt_ids,
                                        len(context.prefix_lens) if context.prefix_lens is not None else 0)
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
        out["adapter_losses"] = adapter_losses
    return _as_requested(out, return_dict, model)


def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                    position_ids=None, **kwargs):
    model = self.get_base_model()
    if inputs_embeds is not None:
        input_ids = None  # PEFT's prompt tuning uses the embeddings when given both
    batch, length, device = _batch_and_length(input_ids, inputs_embeds)
    if position_ids is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
    adapter_names = kwargs.pop("adapter_names", None)
    has_prompt = None
    config = compat.active_config(self)
    multitask = compat.peft_type_name(config) == MULTITASK
    cpt = compat.peft_type_name(config) == "CPT"
    if multitask and adapter_names is not None:
        raise ValueError("adapter_names does not apply to MULTITASK_PROMPT_TUNING adapters: pass task_ids (one task "
                         "per row) instead")
    if cpt and adapter_names is not None:
        raise ValueError("adapter_names is not supported with CPT adapters (their loss is CPT's own)")
    input_type_mask = kwargs.pop("input_type_mask", None)
    if not (multitask or cpt) and adapter_names is None and _packs_prompt(self, model, length, kwargs):
        return _packed_prompt_forward(self, model, input_ids, attention_mask, inputs_embeds, labels,
                                      output_attentions, output_hidden_states, return_dict, kwargs)
    if adapter_names is not None:
        bank = build_bank(self, model, adapter_names, batch, device, want_logits=labels is not None)
        k, context, first_logits = bank.row_lengths, bank.context, bank.first_logits
        has_prompt = bank.row_lengths > 0
    elif multitask:
        k = config.num_virtual_tokens
        task_ids = check_task_ids(task_ids, batch, config.num_tasks, device)
        context, first_logits = multitask_prompts(self, model, task_ids, want_logits=labels is not None)
    else:
        k = config.num_virtual_tokens
        prompt_pass = run_prompt_once(model, prompt_embeddings(self, model), want_logits=labels is not None,
                                      all_logits=cpt and labels is not None)
        context, first_logits = context_for(prompt_pass.layers), prompt_pass.last_logits
    cache = compat.pop_cache(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    _check_mask(attention_mask, length, past)
    position_ids = text_positions(_family(self), k, length, attention_mask=attention_mask, past=past, batch=batch, device=device)
    if cache is not None:
        kwargs[compat.cache_argument(model)] = cache
    num_items = kwargs.pop("num_items_in_batch", None)
    out = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                position_ids=position_ids, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, softprompt_context=context, **kwargs)
    if labels is not None and cpt:
        loss = cpt_loss(prompt_pass.logits, out.logits, labels, input_type_mask, config)
        out = type(out)(loss=loss, **out)
    elif labels is not None:  # rebuilt, not assigned: the loss must come first in the tuple form
        if adapter_names is None:
            out = type(out)(loss=prompt_lm_loss(first_logits, out.logits, labels, num_items, has_prompt), **out)
        else:
            loss, adapter_losses = adapter_lm_losses(first_logits, out.logits, labels, num_items, has_prompt,
                                                     context.prompt_ids, len(context.prefix_lens)
                                                     if context.prefix_lens is not None else 0)
            out = type(out)(loss=loss, **out)
            out["adapter_losses"] = adapter_losses
    return _as_requested(out, return_dict, model)


def _packs_prompt(self, model, length: int, kwargs) -> bool:
    """Whether this forward runs the prompt packed with the text (row 0 of one batch) instead of in its own
    batch-1 pass: on a sharded model (each layer's weights gathered per call: the separate pass would gather
    every layer twice per step, forward and backward), without a cache (the packed row would enter it), and when
    the text is at least as long as the prompt (the prompt row is padded to the text's length, never the
    text rows to the prompt's)."""
    if compat.pop_cache(dict(kwargs)) is not None or kwargs.get("use_cache"):
        return False
    return compat.active_config(self).num_virtual_tokens <= length and is_sharded(model)


def _packed_prompt_forward(self, model, input_ids, attention_mask, inputs_embeds, labels, output_attentions,
                           output_hidden_states, return_dict, kwargs):
    """Prompt/P-tuning with the prompt as row 0 of the batch (docs/DESIGN.md section 8): ``[B + 1, n]``.

    Row 0 holds the k prompt embeddings (padded at the end by repeating the last; causal attention keeps the
    padding out of every real position) at positions 0..n-1; rows 1..B the text at PEFT's positions k.. . In
    each layer the attention of rows 1..B takes row 0's first k keys and values as their prefix, so the layer
    sees the prompt and the text in one call: one gather of its weights, one checkpointed segment, and the
    prompt computed on every rank exactly as in the batch-1 pass. Row 0's logit at position k - 1 predicts every
    row's first token."""
    k = compat.active_config(self).num_virtual_tokens
    family = _family(self)
    prompt = prompt_embeddings(self, model)  # [1, k, hidden]
    text = model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
    batch, length = text.shape[0], text.shape[1]
    prompt_row = torch.cat([prompt, prompt[:, -1:].expand(1, length - k, -1)], dim=1).to(text.dtype)
    embeds = torch.cat([prompt_row, text])
    mask = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask.new_ones(1, length), attention_mask])
    positions = torch.cat([text_positions(family, 0, length, batch=1, device=text.device),
                           text_positions(family, k, length, attention_mask=attention_mask, batch=batch, device=text.device)])
    kwargs.pop("use_cache", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    context = SoftPromptContext.packed(k, batch + 1, text.device)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
                softprompt_context=context, **kwargs)
    fields = {name: _text_rows(value) for name, value in out.items() if name not in ("loss", "past_key_values")}
    if labels is not None:
        loss = prompt_lm_loss(out.logits[:1, k - 1], fields["logits"], labels, num_items)
        fields = {"loss": loss, **fields}  # the loss first, as in the tuple form
    return _as_requested(type(out)(**fields), return_dict, model)


def _text_rows(value):
    """An output field without the packed prompt row (tensors [B + 1, ...] and tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value[1:]
    if isinstance(value, tuple):
        return tuple(_text_rows(v) for v in value)
    return value


# --- encoders (bidirectional attention)


def _encoder_prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                            output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                            position_ids=None, **kwargs):
    """P-Tuning v2 on an encoder: every layer's prefix into non-causal prefix_attention."""
    config = compat.active_config(self)
    model = self.get_base_model()
    k = config.num_virtual_tokens
    batch, length, device = _batch_and_length(input_ids, inputs_embeds)
    if position_ids is None:
        position_ids = text_positions(_family(self), k, length, attention_mask=attention_mask, batch=batch, device=device,
                                      pad_token_id=model.config.pad_token_id)
    else:
        position_ids = position_ids + k
    out = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                position_ids=position_ids, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True,
                softprompt_context=context_for(prefix_tuning_layers(self)), **kwargs)
    return _as_requested(out, return_dict, model)


def _encoder_prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                            output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                            position_ids=None, token_type_ids=None, **kwargs):
    """Prompt/P-tuning/multitask prompt tuning on an encoder: the prompt inserted into the layer-0 input, as PEFT
    does; with MULTITASK_PROMPT_TUNING each row gets its task's prompt (``task_ids`` [B]), one per distinct task.

    Token classification returns logits for the text tokens only, so that labels [B, n] line up.
    """
    config = compat.active_config(self)
    model = self.get_base_model()
    k = config.num_virtual_tokens
    batch, length, device = _batch_and_length(input_ids, inputs_embeds)
    if position_ids is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
    if compat.peft_type_name(config) == MULTITASK:
        prompts, row_prompt = task_prompts(self, model, check_task_ids(task_ids, batch, config.num_tasks, device))
    else:
        prompts, row_prompt = prompt_embeddings(self, model), None  # [1, k, hidden]: every row's
    embedding = model.get_input_embeddings()
    if inputs_embeds is None:
        # validate=False: no device sync per step; a bad id still fails loudly (cpu: error, cuda: NaN row)
        inputs = insert_prompts(input_ids, embedding.weight, prompts, row_prompt, validate=False)
    else:
        rows = prompts.expand(batch, -1, -1) if row_prompt is None else prompts[row_prompt]
        inputs = torch.cat([rows.to(inputs_embeds.dtype), inputs_embeds], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1)
    if token_type_ids is not None:
        token_type_ids = torch.cat([token_type_ids.new_zeros(batch, k), token_type_ids], dim=1)
    per_token = compat.task_type_name(config) == "TOKEN_CLS"
    out = model(inputs_embeds=inputs, attention_mask=attention_mask, token_type_ids=token_type_ids,
                labels=None if per_token else labels, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
    if per_token:
        out.logits = out.logits[:, k:]
        if labels is not None:
            out = type(out)(loss=token_classification_loss(out.logits, labels), **out)
    return _as_requested(out, return_dict, model)


# --- generation


def _generate(self, *gen_args, **gen_kwargs):
    """The base model's generate(), with the prefix computed once and kept out of the KV cache.

    Positions follow the accelerated forward (text from k), so greedy decoding with a cache gives the
    tokens of a greedy loop over the forward itself.
    """
    config = compat.active_config(self)
    model = self.get_base_model()
    if getattr(self, "generation_config", None) is not None:
        model.generation_config = self.generation_config  # one assigned on the PeftModel rules, as in PEFT
    if _adapter_disabled(self):  # with model.disable_adapter(): the base model's tokens
        return model.generate(*gen_args, **gen_kwargs)
    family = _family(self)
    k = config.num_virtual_tokens
    task_ids = gen_kwargs.pop("task_ids", None)
    with torch.no_grad():
        if compat.peft_type_name(config) == MULTITASK:
            ids = gen_kwargs.get("input_ids", gen_args[0] if gen_args else None)
            ids = ids if ids is not None else gen_kwargs["inputs_embeds"]
            task_ids = check_task_ids(task_ids, ids.shape[0], config.num_tasks, ids.device)
            context, _ = multitask_prompts(self, model, task_ids, want_logits=False)
        elif compat.is_kv_prefix(config):
            context = context_for(prefix_tuning_layers(self))
        else:
            context = context_for(run_prompt_once(model, prompt_embeddings(self, model), want_logits=False).layers)

    def wrap(original):
        def prepare_inputs(*args, **kwargs):
            inputs = original(*args, **kwargs)
            x = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            cache = compat.cache_of(inputs)
            past = cache.get_seq_length() if cache is not None else 0
            inputs["position_ids"] = text_positions(family, k, x.shape[1], attention_mask=inputs.get("attention_mask"), past=past,
                                                    batch=x.shape[0], device=x.device)
            inputs["softprompt_context"] = context
            return inputs
        return prepare_inputs

    with compat.patched_prepare_inputs(model, wrap):
        return model.generate(*gen_args, **gen_kwargs)
