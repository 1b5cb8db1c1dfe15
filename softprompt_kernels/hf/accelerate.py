"""``accelerate(peft_model)`` / ``restore(peft_model)``: PEFT prompt learning on fused kernels, in place.

The PEFT model keeps its modules and parameter objects (optimizers made before keep working, PEFT's
``save_pretrained``/``from_pretrained`` are untouched); its ``forward`` and ``generate`` are replaced
on the instance and its base model switches to softprompt attention. ``restore`` undoes all three.
What each PEFT type contributes (its context, its loss, what it refuses) is its row of the method table
(hf/methods.py); this module holds the causal decoders' forwards, encoders' are in hf/encoders.py and
``generate`` in hf/generation.py.

Causal decoders (docs/DESIGN.md section 3, exact):
- PREFIX_TUNING, CARTRIDGE: each layer's prefix goes straight into ``prefix_attention``; never expanded over the
  batch, never concatenated, never in the KV cache.
- PROMPT_TUNING / P_TUNING / MULTITASK_PROMPT_TUNING / CPT: the prompt runs once per call through the frozen model
  (batch 1, or one row per distinct task); its per-layer K/V is the prefix; the last prompt position's logits give
  every row's first-token loss (CPT: every prompt position's logits, for its own loss).
Text positions start at k (PEFT's convention); ``logits`` cover the text positions only.
"""
from __future__ import annotations

import functools
import warnings

import torch

from . import calls, compat, encoders
from .attention import SoftPromptContext, use_softprompt_attention
from .families import family_of
from .generation import generate
from .losses import adapter_lm_losses, prompt_lm_loss
from .methods import METHODS, SUPPORTED_METHODS, OwnModule, bank_prompt, method_of, num_adapters, refusal
from .positions import text_positions
from .prompts import prompt_embeddings
from .sharding import is_sharded  # looked up here on every forward: tests and benchmarks switch packing with it

__all__ = ["AccelerationError", "SUPPORTED_METHODS", "accelerate", "is_accelerated", "restore"]


class AccelerationError(ValueError):
    """The PEFT model cannot be accelerated (method, task or family), with the reason."""


def accelerate(peft_model):
    """Accelerates a PEFT prompt-learning (or ADAPTION_PROMPT) model in place and returns it."""
    if is_accelerated(peft_model):
        return peft_model
    config = compat.active_config(peft_model)
    method = method_of(config)
    if isinstance(method, OwnModule):  # not prompt learning: its own module replaces PEFT's modules' forwards
        reason = method.module.unsupported_reason(peft_model)
        if reason is not None:
            raise AccelerationError(reason)
        method.module.accelerate(peft_model)
        setattr(peft_model, calls.STATE, {"own_module": compat.peft_type_name(config)})
        return peft_model
    model = peft_model.get_base_model()
    family = _checked_family(peft_model, config, method)
    previous_attention = use_softprompt_attention(model)
    if family.causal:
        forward = _prefix_forward if method.kv_prefix else _prompt_forward
    else:
        forward = encoders.prefix_forward if method.kv_prefix else encoders.prompt_forward
    # partials, not bound methods: they pickle (torch.save of the whole model) and keep the signature
    # (Trainer reads forward's parameters to pick dataset columns)
    state = {"attention": previous_attention, "family": family, "forward": functools.partial(forward, peft_model)}
    setattr(peft_model, calls.STATE, state)
    peft_model.forward = state["forward"]
    if family.causal:
        peft_model.generate = functools.partial(generate, peft_model)
    return peft_model


def _checked_family(peft_model, config, method):
    """The base model's family, once the method, its task and the family are known to go together."""
    if config is None or not getattr(config, "is_prompt_learning", False):
        raise AccelerationError(f"accelerate() takes a PEFT model whose active adapter is one of {list(METHODS)}; "
                                f"got {type(peft_model).__name__}")
    if method is None:
        raise AccelerationError(f"peft_type {compat.peft_type_name(config)} is not supported; supported: "
                                f"{list(SUPPORTED_METHODS)}")
    model = peft_model.get_base_model()
    family = family_of(model.config, model)
    reason = refusal(method, config, family)
    if reason is not None:
        raise AccelerationError(reason)
    return family


def restore(peft_model):
    """Undoes ``accelerate``; returns the model."""
    state = calls.state(peft_model)
    if state is None:
        return peft_model
    if "own_module" in state:
        METHODS[state["own_module"]].module.restore(peft_model)
        delattr(peft_model, calls.STATE)
        return peft_model
    for name in ("forward", "generate"):
        peft_model.__dict__.pop(name, None)
    compat.set_attention_implementation(peft_model.get_base_model(), state["attention"])
    delattr(peft_model, calls.STATE)
    return peft_model


def is_accelerated(peft_model) -> bool:
    return calls.state(peft_model) is not None


# --- causal decoders

def _prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                    position_ids=None, adapter_names=None, **kwargs):
    """KV-prefix methods (PREFIX_TUNING, CARTRIDGE) on a causal decoder: every layer's prefix into the op, the
    model's own loss. ``position_ids`` given are PEFT's: offset by k, as the prefix's positions come first.

    ``adapter_names`` [B] (optional): each row's adapter among the model's KV-prefix adapters (None: the bare model
    for that row); one bank, every row its own prefix and positions (hf/multi_prompt.py). With labels the output
    also carries ``adapter_losses`` [A], each distinct adapter's loss over its own rows, in order of first use.
    """
    method = method_of(compat.active_config(self))
    model = self.get_base_model()
    batch, length, device = calls.batch_and_length(input_ids, inputs_embeds)
    prompt = _text_prompt(self, model, method, adapter_names, task_ids, batch, device, want_logits=False)
    past = _cache_back(model, attention_mask, length, kwargs)
    if position_ids is None:
        position_ids = text_positions(calls.family(self), prompt.lengths, length, attention_mask=attention_mask,
                                      past=past, batch=batch, device=device)
    else:  # PEFT's offset
        k = prompt.lengths
        position_ids = position_ids + (k[:, None] if isinstance(k, torch.Tensor) else k)
    per_adapter = adapter_names is not None and labels is not None
    out = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                labels=None if per_adapter else labels, position_ids=position_ids, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, softprompt_context=prompt.context,
                **kwargs)
    if per_adapter:  # the model's loss (labels shifted inside), and each adapter's share of it
        out = _with_adapter_losses(out, prompt, labels, kwargs.get("num_items_in_batch"))
    return calls.as_requested(out, return_dict, model)


def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                    position_ids=None, adapter_names=None, input_type_mask=None, **kwargs):
    """Prompt methods (PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING, CPT) on a causal decoder: the prompt's
    per-layer K/V from one pass (or packed with the text on a sharded model), the loss of the method's row.
    ``position_ids`` are ignored with PEFT's warning: text positions start at each row's k.

    ``adapter_names`` [B] (optional; PROMPT_TUNING and P_TUNING): each row's adapter among the model's prompt
    adapters (None: the bare model for that row); their prompts run through the model together and every row
    reads its own (hf/multi_prompt.py). With labels the output also carries ``adapter_losses`` [A], each distinct
    adapter's loss over its own rows, in order of first use.
    ``task_ids`` [B]: MULTITASK_PROMPT_TUNING's task of each row. ``input_type_mask`` [B, n]: CPT's token types of
    the text, as in PEFT (None: every token a label). Other methods ignore both.
    """
    config = compat.active_config(self)
    method = method_of(config)
    model = self.get_base_model()
    if inputs_embeds is not None:
        input_ids = None  # PEFT's prompt tuning uses the embeddings when given both
    batch, length, device = calls.batch_and_length(input_ids, inputs_embeds)
    if position_ids is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
    method.check_adapter_names(adapter_names)
    if method.packs_when_sharded and adapter_names is None and _packs_prompt(self, model, length, kwargs):
        return _packed_prompt_forward(self, model, input_ids, attention_mask, inputs_embeds, labels,
                                      output_attentions, output_hidden_states, return_dict, kwargs)
    prompt = _text_prompt(self, model, method, adapter_names, task_ids, batch, device, want_logits=labels is not None)
    past = _cache_back(model, attention_mask, length, kwargs)
    position_ids = text_positions(calls.family(self), prompt.lengths, length, attention_mask=attention_mask, past=past,
                                  batch=batch, device=device)
    num_items = kwargs.pop("num_items_in_batch", None)
    out = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                position_ids=position_ids, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=True, softprompt_context=prompt.context,
                **kwargs)
    if labels is not None and adapter_names is not None:
        out = _with_adapter_losses(out, prompt, labels, num_items)
    elif labels is not None:  # rebuilt, not assigned: the loss must come first in the tuple form
        out = type(out)(loss=method.loss(prompt, out.logits, labels, num_items, input_type_mask, config), **out)
    return calls.as_requested(out, return_dict, model)



def _text_prompt(self, model, method, adapter_names, task_ids, batch: int, device, want_logits: bool):
    """The bank of the adapters the rows name, or else the active adapter's prompt (its method's row)."""
    if adapter_names is not None:
        return bank_prompt(self, model, adapter_names, batch, device, want_logits)
    return method.text_prompt(self, model, task_ids, batch, device, want_logits)


def _cache_back(model, attention_mask, length: int, kwargs) -> int:
    """The cached length; checks that the mask covers cache and text, and puts the cache back into ``kwargs``
    under the model's name for it."""
    cache = compat.pop_cache(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and attention_mask.shape[-1] != past + length:
        raise ValueError(f"attention_mask must cover the {past} cached and {length} new tokens ([B, {past + length}]), "
                         f"got shape {tuple(attention_mask.shape)}")
    if cache is not None:
        kwargs[compat.cache_argument(model)] = cache
    return past


def _with_adapter_losses(out, prompt, labels, num_items_in_batch):
    """``out`` with the batch's loss first and ``adapter_losses`` [A] (each adapter's over its rows) after."""
    loss, adapter_losses = adapter_lm_losses(prompt.first_logits, out.logits, labels, num_items_in_batch,
                                             prompt.has_prompt, prompt.context.prompt_ids,
                                             num_adapters(prompt.context))
    out = type(out)(loss=loss, **{name: value for name, value in out.items() if name != "loss"})
    out["adapter_losses"] = adapter_losses
    return out


# --- the prompt packed with the text (sharded models)


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
    family = calls.family(self)
    prompt = prompt_embeddings(self, model)  # [1, k, hidden]
    text = model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
    batch, length = text.shape[0], text.shape[1]
    prompt_row = torch.cat([prompt, prompt[:, -1:].expand(1, length - k, -1)], dim=1).to(text.dtype)
    embeds = torch.cat([prompt_row, text])
    mask = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask.new_ones(1, length), attention_mask])
    positions = torch.cat([text_positions(family, 0, length, batch=1, device=text.device),
                           text_positions(family, k, length, attention_mask=attention_mask, batch=batch,
                                          device=text.device)])
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
    return calls.as_requested(type(out)(**fields), return_dict, model)


def _text_rows(value):
    """An output field without the packed prompt row (tensors [B + 1, ...] and tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value[1:]
    if isinstance(value, tuple):
        return tuple(_text_rows(v) for v in value)
    return value
