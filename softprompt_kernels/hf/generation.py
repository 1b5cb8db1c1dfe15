"""``generate`` of an accelerated causal decoder: the base model's, with the adapter's context computed once (its
row of the method table, without logits), kept out of the KV cache, and text positions from k.

Positions follow the accelerated forward, so greedy decoding with a cache gives the tokens of a greedy loop over
the forward itself (docs/DESIGN.md section 8)."""
from __future__ import annotations

import torch

from . import calls, compat
from .methods import method_of
from .positions import text_positions


def generate(self, *gen_args, **gen_kwargs):
    """The base model's generate() with the adapter's prefix in every step (``task_ids`` [B]: multitask rows' tasks)."""
    config = compat.active_config(self)
    model = self.get_base_model()
    if getattr(self, "generation_config", None) is not None:
        model.generation_config = self.generation_config  # one assigned on the PeftModel rules, as in PEFT
    if calls.adapter_disabled(self):  # with model.disable_adapter(): the base model's tokens
        return model.generate(*gen_args, **gen_kwargs)
    task_ids = gen_kwargs.pop("task_ids", None)
    batch, device = _rows(gen_args, gen_kwargs)
    with torch.no_grad():
        prompt = method_of(config).text_prompt(self, model, task_ids, batch, device, want_logits=False)
    wrap = _with_positions_and_context(calls.family(self), prompt.lengths, prompt.context)
    with compat.patched_prepare_inputs(model, wrap):
        return model.generate(*gen_args, **gen_kwargs)


def _rows(gen_args, gen_kwargs):
    """(rows, device) of the input generate() was given (None, None without one: only multitask rows need it)."""
    x = gen_kwargs.get("input_ids", gen_args[0] if gen_args else None)
    x = x if x is not None else gen_kwargs.get("inputs_embeds")
    return (x.shape[0], x.device) if x is not None else (None, None)


def _with_positions_and_context(family, k, context):
    """A wrapper of ``prepare_inputs_for_generation`` adding each step's text positions and the context."""

    def wrap(original):
        def prepare_inputs(*args, **kwargs):  # these names: generate reads "kwargs" off the signature
            inputs = original(*args, **kwargs)
            x = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            cache = compat.cache_of(inputs)
            past = cache.get_seq_length() if cache is not None else 0
            inputs["position_ids"] = text_positions(family, k, x.shape[1], attention_mask=inputs.get("attention_mask"),
                                                    past=past, batch=x.shape[0], device=x.device)
            inputs["softprompt_context"] = context
            return inputs
        return prepare_inputs
    return wrap
