"""PEFT's ADAPTION_PROMPT (LLaMA-Adapter) on ``prefix_attention``, in place (docs/DESIGN.md section 8).

PEFT wraps the top ``adapter_layers`` attention modules: each returns its attention output plus
``gate * softmax(q K_a^T / sqrt(d)) V_a`` over the ``adapter_len`` adapter tokens (a softmax of their own,
K_a/V_a the layer's k/v projections of the learned ``adaption_prompt`` [1, L, hidden], no rotary), through the
output projection (Llama, Mistral) or added after it (GPT-2). PEFT repeats K_a/V_a over the batch, repeats the
kv heads for GQA and keeps the [B, H, Lq, L] scores for backward. Here the adapter term is one prefix-only
``prefix_attention`` call (Lk = 0, non-causal: docs/DESIGN.md section 2) with K_a/V_a as a one-prompt bank
[1, Hkv, L, D] that every row reads: computed once per layer and forward at batch 1, never repeated, the
kv-head groups read in place, the scores never stored. The wrapped attention itself runs as it did.

``accelerate`` replaces ``forward`` on the instance of every AdaptedAttention module of every adapter
(the active one's and those PEFT keeps swapped out for ``set_adapter``); modules and parameter objects stay,
so optimizers, ``save_pretrained``/``from_pretrained`` and PEFT's adapter switching keep working. Adapters
added after ``accelerate`` run PEFT's own forward. ``generate`` is PEFT's with the forward's position numbering
(what a greedy loop over the forward sees). ``restore`` removes the instance attributes.
"""
from __future__ import annotations

import functools

import torch

from ..ops import prefix_attention
from . import compat

_FORWARD = "forward"


def unsupported_reason(peft_model):
    """Why this adaption-prompt model cannot be accelerated (None: it can)."""
    model_type = peft_model.get_base_model().config.model_type
    supported = compat.adaption_prompt_model_types()
    if model_type not in supported:
        return (f"ADAPTION_PROMPT on {model_type} is not supported: PEFT's adaption prompt has a query "
                f"recomputation only for {list(supported)}")
    if not compat.adapted_attentions(peft_model):
        return "this ADAPTION_PROMPT model has no adapted attention modules: nothing to accelerate"
    return None


def accelerate(peft_model) -> None:
    """Every adapter's adapted-attention modules compute their adapter term with ``prefix_attention``;
    ``generate`` numbers positions as the forward does."""
    for module in compat.adapted_attentions(peft_model):
        forward = _gpt2_forward if compat.adaption_is_gpt2(module) else _projected_forward
        # partials of module-level functions (not closures): the model still pickles
        setattr(module, _FORWARD, functools.partial(forward, module))
    peft_model.generate = functools.partial(_generate, peft_model)


def restore(peft_model) -> None:
    for module in compat.adapted_attentions(peft_model):
        module.__dict__.pop(_FORWARD, None)
    peft_model.__dict__.pop("generate", None)


def _generate(peft_model, *args, **kwargs):
    """PEFT's generate, with the positions the forward uses (its default numbering, padding included) instead of
    the ones generate derives from the attention mask: greedy decoding then gives the tokens of a greedy loop over
    the forward (docs/DESIGN.md section 6). Only absolute positions (GPT-2) tell the two apart on left padding."""

    def wrap(original):
        def prepare_inputs(*args, **kwargs):  # these names: generate reads "kwargs" off the signature
            inputs = original(*args, **kwargs)
            inputs.pop("position_ids", None)  # the model numbers from the cache position, as in its forward
            return inputs
        return prepare_inputs

    with compat.patched_prepare_inputs(peft_model.get_base_model(), wrap):
        return type(peft_model).generate(peft_model, *args, **kwargs)


def adapter_term(module, query: torch.Tensor) -> torch.Tensor:
    """gate * softmax(q K_a^T / sqrt(d)) V_a of one adapted layer, [B, Lq, Hq * D] (heads concatenated).

    query [B, Hq, Lq, D]: the wrapped attention's queries (after rotary)."""
    batch, _, length, head_dim = query.shape
    keys, values = compat.adaption_key_values(module)  # [1, L, Hkv * D] each, batch 1
    # [1, Hkv, L, D]: a bank of one prompt, read by every row (prompt_ids None); no copy over the batch
    prefix_k = keys.view(1, keys.shape[1], -1, head_dim).transpose(1, 2).to(query.dtype)
    prefix_v = values.view(1, values.shape[1], -1, head_dim).transpose(1, 2).to(query.dtype)
    no_keys = query.new_empty(batch, prefix_k.shape[1], 0, head_dim)  # [B, Hkv, 0, D]: prefix-only
    # PEFT's scale: 1 / sqrt(head_dim), whatever scaling the model's own attention uses
    out = prefix_attention(query, no_keys, no_keys, prefix_k, prefix_v, causal=False,
                           scale=float(module.model.head_dim) ** -0.5)  # [B, Hq, Lq, D]
    return module.adaption_gate.to(query.dtype) * out.transpose(1, 2).reshape(batch, length, -1)


def _projected_forward(module, **kwargs):
    """Llama and Mistral (PEFT's AdaptedAttention): output + o_proj(adapter term), keyword arguments only."""
    if kwargs.get("output_attention", False):
        raise NotImplementedError("output_attention is not currently supported.")  # as PEFT
    output, *rest = module.model(**kwargs)
    arguments = {name: value for name, value in kwargs.items() if name != "hidden_states"}
    query = compat.adaption_query_states(module, kwargs["hidden_states"], arguments)
    term = adapter_term(module, query)
    projection = compat.adaption_output_projection(module)
    if projection is not None:
        term = projection(term)
    return ((output + term).to(query.dtype), *rest)


def _gpt2_forward(module, hidden_states, *args, **kwargs):
    """GPT-2 (PEFT's AdaptedAttentionGPT): the adapter term added after c_proj, unprojected."""
    outputs = module.model(hidden_states, *args, **kwargs)
    query = compat.adaption_query_states(module, hidden_states, kwargs)
    term = adapter_term(module, query)
    return ((outputs[0] + term).to(query.dtype), *outputs[1:])
