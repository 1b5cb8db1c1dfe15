"""Our attention inside Hugging Face models: ``prefix_attention`` behind transformers' interfaces.

Registers one attention function with ``AttentionInterface`` and one mask function with
``AttentionMaskInterface`` under the name ``"softprompt"`` (without the mask function, transformers
would build no padding mask at all for an unknown implementation). The mask function hands the
attention the 2D key padding mask (bool ``[B, Lk]``); causality is applied by the op itself
(bottom-right aligned, so prefill and cached decoding are the same call).

Each forward call may carry ``softprompt_context=SoftPromptContext(...)`` among its keyword
arguments; transformers passes extra keyword arguments through to the attention function, so every
layer finds its own prefix there (``module.layer_idx``) without global state.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..common import warn_once
from ..ops import prefix_attention
from . import compat

ATTENTION_NAME = "softprompt"


class SoftPromptContext:
    """The prefixes of one forward call: per layer ``(prefix_k, prefix_v)``, each ``[P, Hkv, K, D]``.

    ``prompt_ids [B]`` picks each row's prefix (-1: none; None: P must be 1) and ``prefix_lens [P]``
    how many slots each prompt uses, exactly as in ``prefix_attention``.

    A plain class, on purpose not a dataclass, list or registered pytree: wrappers that walk a module's
    keyword arguments rebuild such containers when they hold tensors that need gradients (FSDP2's
    ``fully_shard`` hands each sharded layer a copy), and the capture of the prompt pass would then be
    written into a copy and lost. Opaque, every layer sees this one object.
    """

    __slots__ = ("layer_prefixes", "prompt_ids", "prefix_lens", "prefix_after_padding", "captured", "packed_prompt")

    def __init__(self, layer_prefixes: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]],
                 prompt_ids: Optional[torch.Tensor] = None, prefix_lens: Optional[torch.Tensor] = None,
                 prefix_after_padding: bool = False,
                 captured: Optional[List[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None,
                 packed_prompt: Optional[int] = None):
        self.layer_prefixes = layer_prefixes
        self.prompt_ids = prompt_ids
        self.prefix_lens = prefix_lens
        # With a sliding window: True puts each row's prefix right before its first real key (serving, so that a
        # left-padded request sees the window it would see alone); False right before the padded sequence, where
        # PEFT's cache puts it (training parity).
        self.prefix_after_padding = prefix_after_padding
        # Capture mode (the batch-1 prompt pass): no prefix; each layer records its (key, value) here.
        self.captured = captured
        # Packed mode (sharded training, docs/DESIGN.md section 8): row 0 of the batch is the prompt (k = this
        # many positions, padded at the end); every other row's prefix is row 0's first k keys and values of the
        # same layer, so the prompt and the text go through each layer in one call.
        self.packed_prompt = packed_prompt

    @classmethod
    def capturing(cls, num_layers: int) -> "SoftPromptContext":
        return cls(layer_prefixes=None, captured=[None] * num_layers)

    @classmethod
    def packed(cls, k: int, batch: int, device) -> "SoftPromptContext":
        """For a packed batch of ``batch`` rows (the prompt first): row 0 has no prefix, the others row 0's."""
        prompt_ids = torch.zeros(batch, dtype=torch.long, device=device)
        prompt_ids[0] = -1
        return cls(layer_prefixes=None, prompt_ids=prompt_ids, packed_prompt=k)

    def prefix(self, layer_idx: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer_idx is None or not 0 <= layer_idx < len(self.layer_prefixes):
            raise ValueError(f"softprompt_context has prefixes for {len(self.layer_prefixes)} layers; an attention "
                             f"module with layer_idx={layer_idx!r} asked for one")
        return self.layer_prefixes[layer_idx]

    def __repr__(self) -> str:
        layers = None if self.layer_prefixes is None else len(self.layer_prefixes)
        return (f"SoftPromptContext(layers={layers}, prompt_ids={self.prompt_ids}, prefix_lens={self.prefix_lens}, "
                f"capturing={self.captured is not None}, packed_prompt={self.packed_prompt})")


def softprompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                         softprompt_context: Optional[SoftPromptContext] = None,
                         sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                         s_aux: Optional[torch.Tensor] = None, **kwargs):
    """The function transformers calls: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (with the cache).

    The layer's own sliding window, logit soft-capping and attention sinks (``s_aux``, gpt-oss) go to
    the op as ``window``, ``softcap`` and ``sinks``: per layer, as each layer passes them."""
    if kwargs.get("output_attentions", False):
        warn_once("output_attentions", "softprompt attention never materialises attention weights: "
                                        "output_attentions returns None for them")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("softprompt attention takes a 2D key padding mask [B, Lk]; got a "
                         f"{attention_mask.dim()}D attention_mask (pass a 2D 0/1 attention_mask to the model)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    layer_idx = getattr(module, "layer_idx", None)
    query, key, value = _common_dtype(query, key, value)
    if softprompt_context is not None and softprompt_context.captured is not None:
        softprompt_context.captured[layer_idx] = (key, value)
        softprompt_context = None
    if softprompt_context is not None and softprompt_context.packed_prompt is not None:
        # row 0 is the prompt: its first k keys and values of this layer are every other row's prefix (views;
        # autograd adds the prefix gradient to row 0's key/value gradient)
        k = softprompt_context.packed_prompt
        prefix_k, prefix_v = key[:1, :, :k], value[:1, :, :k]
        prompt_ids, prefix_lens = softprompt_context.prompt_ids, None
        after_padding = softprompt_context.prefix_after_padding
    elif softprompt_context is not None:
        prefix_k, prefix_v = (p.to(query.dtype) for p in softprompt_context.prefix(layer_idx))
        prompt_ids, prefix_lens = softprompt_context.prompt_ids, softprompt_context.prefix_lens
        after_padding = softprompt_context.prefix_after_padding
    else:
        prefix_k = prefix_v = key.new_zeros((1, key.shape[1], 0, key.shape[3]))
        prompt_ids = prefix_lens = None
        after_padding = False
    # the mask's window is what eager and SDPA attention apply (the argument serves flash attention); they agree
    # where a family passes both
    window = getattr(attention_mask, WINDOW_ATTRIBUTE, None) if attention_mask is not None else None
    if window is None:
        window = sliding_window
    mask = attention_mask.bool() if attention_mask is not None else None
    prefix_offsets = None
    if window is not None and after_padding and mask is not None:
        # the row's leading padding among these keys (a cropped sliding cache has dropped the oldest first)
        prefix_offsets = (mask.cumsum(-1) == 0).sum(-1)
    features = dict(window=int(window) if window is not None else None,
                    softcap=float(softcap) if softcap is not None else None,
                    sinks=s_aux.to(query.dtype) if s_aux is not None else None, prefix_offsets=prefix_offsets)
    # attention dropout (training) runs on the torch backend, the one with dropout: auto takes it and says why once
    out = prefix_attention(query, key, value, prefix_k, prefix_v, prompt_ids=prompt_ids, prefix_lens=prefix_lens,
                           causal=causal, key_padding_mask=mask, scale=scaling, dropout_p=dropout, **features)
    return out.transpose(1, 2), None


def _common_dtype(query, key, value):
    """One dtype for the op: autocast's where it is on (as SDPA would run), else the query's."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = query.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


WINDOW_ATTRIBUTE = "_softprompt_window"


def softprompt_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                    mask_function=None, attention_mask: Optional[torch.Tensor] = None, device=None, **kwargs):
    """The mask transformers builds for us: the 2D key padding mask (bool [B, kv_length]) or None.

    When the model's mask function applies a sliding window, the mask carries it (as an attribute of the
    returned tensor, an all-True mask when there is no padding): some families put their window only
    into the mask, not into the arguments of their attention."""
    window = compat.sliding_window_of(mask_function)
    if attention_mask is None:
        if window is None:
            return None
        mask = torch.ones((batch_size, kv_length), dtype=torch.bool, device=device)
    else:
        mask = attention_mask[:, -kv_length:].bool()
        if mask.shape[-1] != kv_length:
            raise ValueError(f"attention_mask covers {mask.shape[-1]} keys but attention sees {kv_length}: a mask "
                             "shorter than the sequence, or a static cache (which softprompt attention does not take)")
    if window is not None:
        setattr(mask, WINDOW_ATTRIBUTE, window)
    return mask


def register() -> None:
    """Makes ``attn_implementation="softprompt"`` known to transformers (idempotent)."""
    compat.register_attention(ATTENTION_NAME, softprompt_attention, softprompt_mask)


def use_softprompt_attention(model) -> str:
    """Switches a transformers model to softprompt attention; returns the implementation it had."""
    register()
    previous = compat.attention_implementation(model)
    compat.set_attention_implementation(model, ATTENTION_NAME)
    return previous


register()  # at import: a model saved while accelerated (attn_implementation="softprompt") loads anywhere
