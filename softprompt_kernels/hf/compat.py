"""Every transformers and PEFT internal the integration touches, in one file.

An upgrade of either library that renames an attribute or moves an import is mended here. Public,
documented API (``get_peft_model``, ``PeftConfig``, ``model.generate``) is used directly elsewhere;
what sits here is what those libraries may change without notice: PEFT's prompt-encoder attributes,
transformers' attention registries, the cache argument's name, gradient-checkpointing flags.
Tested versions: softprompt_kernels/versions.py (checked once when the HF layer is imported).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Optional

import torch

# --- PEFT: configs


def peft_type_name(peft_config) -> str:
    """'PROMPT_TUNING', 'P_TUNING', 'PREFIX_TUNING', ... (PEFT keeps an enum; saved configs hold strings)."""
    peft_type = peft_config.peft_type
    return getattr(peft_type, "value", str(peft_type))


# PEFT types whose adapter is a per-layer key/value prefix: the prompt encoder's output [k, layers * 2 * Hkv * D]
# (PEFT's forward treats CARTRIDGE, a prefix with frozen first slots, exactly as PREFIX_TUNING).
KV_PREFIX_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def is_kv_prefix(peft_config) -> bool:
    return peft_type_name(peft_config) in KV_PREFIX_TYPES


def task_type_name(peft_config) -> Optional[str]:
    task = getattr(peft_config, "task_type", None)
    return getattr(task, "value", task)


def active_config(peft_model):
    """The PeftConfig of the active adapter, or None for something that is not a PEFT model."""
    return getattr(peft_model, "active_peft_config", None)


def adapter_config(peft_model, adapter: Optional[str] = None):
    return peft_model.peft_config[adapter or peft_model.active_adapter]


def adapter_names(peft_model):
    return list(peft_model.peft_config)


def is_peft_prompt_model(source) -> bool:
    """A live PEFT model carrying prompt-learning adapters (duck-typed: PEFT's classes vary by task)."""
    return hasattr(source, "prompt_encoder") and hasattr(source, "active_peft_config")


# --- PEFT: the prompt encoder and its input tokens


def prompt_encoder(peft_model, adapter: Optional[str] = None) -> torch.nn.Module:
    return peft_model.prompt_encoder[adapter or peft_model.active_adapter]


def prompt_encoder_weight(encoder: torch.nn.Module) -> torch.Tensor:
    """The virtual-token embedding table of a prompt encoder (every PEFT prompt encoder has one)."""
    return encoder.embedding.weight


def prompt_tokens(peft_model, adapter: Optional[str] = None) -> torch.Tensor:
    """The virtual-token ids PEFT feeds its prompt encoder ([total virtual tokens], 0..k-1)."""
    return peft_model.prompt_tokens[adapter or peft_model.active_adapter]


def base_model_dtype(peft_model) -> Optional[torch.dtype]:
    """The dtype PEFT casts prefix-tuning key/values to (None when PEFT did not record one)."""
    return getattr(peft_model, "base_model_torch_dtype", None)


# --- transformers: attention registries and implementation switch


def register_attention(name: str, attention_fn, mask_fn) -> None:
    """Registers an attention function and its mask builder under ``name`` (both are needed: without
    the mask function transformers builds no padding mask for an unknown implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def is_masked_lm_family(model_type) -> bool:
    """A bidirectional encoder family (one transformers maps to a masked-LM head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def sliding_window_of(mask_function, _depth: int = 0):
    """The sliding window a transformers mask function applies (None if none).

    Some families build a sliding-window mask without passing ``sliding_window`` to their attention
    (PhiMoE): the window then lives only in the mask function, a composition (and_masks / or_masks) of
    closures one of which is ``sliding_window_overlay(sliding_window)``; it is found by walking them."""
    if mask_function is None or _depth > 8 or not hasattr(mask_function, "__code__"):
        return None
    cells = dict(zip(mask_function.__code__.co_freevars, (c.cell_contents for c in mask_function.__closure__ or ())))
    if mask_function.__qualname__.startswith("sliding_window_overlay") and isinstance(cells.get("sliding_window"), int):
        return cells["sliding_window"]
    for value in cells.values():
        for inner in value if isinstance(value, (tuple, list)) else (value,):
            if callable(inner):
                window = sliding_window_of(inner, _depth + 1)
                if window is not None:
                    return window
    return None


def attention_implementation(model) -> str:
    return model.config._attn_implementation


def set_attention_implementation(model, name: str) -> None:
    model.set_attn_implementation(name)


def text_config(model_or_config):
    """The decoder's config (multimodal configs nest it; text-only configs return themselves)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config()


# --- transformers: the KV cache argument


def cache_argument(model) -> str:
    """The name of the model's cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def pop_cache(kwargs: Dict[str, Any]):
    """Removes and returns the cache from forward kwargs under either of its names."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def cache_of(model_inputs: Dict[str, Any]):
    """The cache in the inputs ``prepare_inputs_for_generation`` returned, under either name."""
    cache = model_inputs.get("cache")
    return cache if cache is not None else model_inputs.get("past_key_values")


def new_dynamic_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# --- transformers: KV caches whose rows join and leave (continuous batching)


def cache_is_joinable(model) -> bool:
    """Whether every layer of the model's dynamic cache is a plain growing layer ([B, H, L, D] that can be
    left-padded, merged and split by row); sliding-window layers keep one length for the whole batch."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in new_dynamic_cache(model).layers)


def _set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    layer.device, layer.dtype = keys.device, keys.dtype
    layer.is_initialized = True


def cache_select(cache, index: torch.Tensor):
    """A new cache holding the rows ``index`` of ``cache`` (the original is left as it is)."""
    import copy

    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]  # keeps a sliding layer's window and length
    for layer in selected.layers:
        _set_layer(layer, layer.keys.index_select(0, index), layer.values.index_select(0, index))
    return selected


def cache_merge(cache, other):
    """``cache`` with the rows of ``other`` appended; both left-padded (zeros) to the longer length."""
    for layer, extra in zip(cache.layers, other.layers):
        width = max(layer.keys.shape[-2], extra.keys.shape[-2])
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))  # noqa: E731
        _set_layer(layer, torch.cat([pad(layer.keys), pad(extra.keys)]), torch.cat([pad(layer.values), pad(extra.values)]))
    return cache


def cache_snapshot(cache):
    """What ``cache_restore`` needs to undo a forward that failed halfway (layers before the failure already
    appended their keys): references only, since every update makes new tensors."""
    return [(layer, layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in cache.layers]


def cache_restore(snapshot) -> None:
    for layer, keys, values, length in snapshot:
        layer.keys, layer.values = keys, values
        if length is not None:
            layer.cumulative_length = length


def cache_drop_front(cache, count: int) -> None:
    """Drops the first ``count`` positions of every row (padding that no row needs any more)."""
    for layer in cache.layers:
        _set_layer(layer, layer.keys[..., count:, :], layer.values[..., count:, :])


# --- transformers: generation hook


@contextlib.contextmanager
def patched_prepare_inputs(model, wrap):
    """Runs a block with ``model.prepare_inputs_for_generation`` replaced by ``wrap(original)``.

    generate() validates its keyword arguments against this method's signature, so the wrapper
    must accept ``*args, **kwargs`` and return the inputs dict."""
    original = model.prepare_inputs_for_generation
    model.prepare_inputs_for_generation = wrap(original)
    try:
        yield
    finally:
        del model.prepare_inputs_for_generation


# --- transformers: activation checkpointing


@contextlib.contextmanager
def activation_checkpointing_disabled(model):
    """Turns off the ``gradient_checkpointing`` flag transformers sets on checkpointed layers, for one block."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


# --- PEFT: saving an adapter on a sharded model


def save_prompt_adapter(peft_model, directory: str, is_main_process: bool) -> None:
    """PEFT's ``save_pretrained`` without ``model.state_dict()``: a prompt-learning adapter's tensor comes from the
    prompt encoder (``get_prompt_embedding_to_save``), never from the state dict, and under FSDP2 taking the
    state dict reshards the module (its pre-save hook) before the encoder runs. An explicit empty
    ``state_dict`` skips it; PEFT ignores its contents for prompt learning."""
    peft_model.save_pretrained(directory, is_main_process=is_main_process, state_dict={})


# --- PEFT: ADAPTION_PROMPT (LLaMA-Adapter) modules


def adaption_prompt_model_types() -> tuple:
    """The transformers model types PEFT's adaption prompt has a query recomputation for (llama, mistral, gpt2)."""
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    return tuple(TRANSFORMERS_MODEL_CONFIG)


def adapted_attentions(peft_model) -> list:
    """Every adapter's AdaptedAttention modules: the active adapter's sit in the model, the others in PEFT's
    ``_cached_adapters`` (swapped in by ``set_adapter``), or all of them there while the adapter is disabled."""
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention

    tuner = peft_model.base_model
    found = [m for m in tuner.model.modules() if isinstance(m, _BaseAdaptedAttention)]
    for cached in getattr(tuner, "_cached_adapters", {}).values():
        found.extend(m for m in cached if m not in found)
    return found


def adaption_is_gpt2(module) -> bool:
    """PEFT's GPT-2 variant: its fused c_attn gives q, k and v, and the adapter output is added unprojected."""
    from peft.tuners.adaption_prompt.layer import AdaptedAttentionGPT

    return isinstance(module, AdaptedAttentionGPT)


def adaption_key_values(module):
    """(keys, values) of the module's adaption prompt, each [1, adapter_len, Hkv * head_dim]: the wrapped
    attention's own k/v projections (no rotary: the adapter tokens have no position)."""
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    layers = TRANSFORMERS_MODEL_CONFIG[module.model_type]
    prompt = module.adaption_prompt
    if layers.v_proj_layer in (None, layers.k_proj_layer):  # one fused projection (GPT-2's c_attn): [q | k | v]
        _, keys, values = getattr(module.model, layers.k_proj_layer)(prompt).split(module.model.embed_dim, dim=2)
        return keys, values
    return getattr(module.model, layers.k_proj_layer)(prompt), getattr(module.model, layers.v_proj_layer)(prompt)


def adaption_output_projection(module):
    """The wrapped attention's output projection the adapter term goes through (None for GPT-2: PEFT adds it
    after c_proj, unprojected)."""
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    name = TRANSFORMERS_MODEL_CONFIG[module.model_type].o_proj_layer
    return None if name is None else getattr(module.model, name)


def adaption_query_states(module, hidden_states, kwargs):
    """The wrapped attention's queries [B, Hq, Lq, D] (after rotary), recomputed as PEFT does: transformers'
    attention modules do not return them."""
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    compute = TRANSFORMERS_MODEL_CONFIG[module.model_type].compute_query_states
    if adaption_is_gpt2(module):
        return compute(module.model, hidden_states=hidden_states,
                       encoder_hidden_states=kwargs.get("encoder_hidden_states"))
    return compute(model=module.model, hidden_states=hidden_states, **kwargs)
