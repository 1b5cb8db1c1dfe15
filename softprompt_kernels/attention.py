"""The public ``prefix_attention`` op."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._validation import PrefixAttentionInputs, check_index_values, validate_prefix_attention_args
from . import _ops, cuda_backend, reference  # noqa: F401  (register the torch, cpu and cuda backends)
from .backends import check_backend_name, get_backend, select_backend
from .triton import op as _triton_op  # noqa: F401  (registers the triton backend)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prompt_ids: Optional[torch.Tensor] = None,
    prefix_lens: Optional[torch.Tensor] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    prefix_offsets: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over a shared bank of soft-prompt prefixes plus each row's own keys.

    Args:
        q: ``[B, Hq, Lq, D]`` queries; any strides (Hugging Face's transposed views are taken as they are).
        k, v: ``[B, Hkv, Lk, D]`` sequence keys and values, ``Lq <= Lk`` (or ``Lk = 0`` with ``causal=False``
            and no window: prefix-only attention, a separate softmax over the prompt) and ``Hq % Hkv == 0``
            (q head ``h`` uses kv head ``h // (Hq // Hkv)``).
        prefix_k, prefix_v: ``[P, Hkv, K, D]`` a bank of ``P`` prefixes of ``K`` slots (``K`` may be 0).
        prompt_ids: int ``[B]`` in ``[-1, P)``: the prefix of each row, -1 for none. ``None`` needs ``P == 1``.
        prefix_lens: int ``[P]`` in ``[0, K]``: prompt ``p`` uses its first ``prefix_lens[p]`` slots
            (``None``: all ``K``).
        causal: sequence key ``j`` is visible to query ``i`` iff ``j <= i + (Lk - Lq)`` (bottom-right
            aligned, so decoding and chunked prefill are the same op). The prefix is never masked.
        key_padding_mask: bool ``[B, Lk]``, ``True`` = real token; any padding pattern.
        scale: softmax scale, default ``D ** -0.5``.
        window: sliding window ``>= 1``: a key is visible only if ``index(query) - index(key) < window``,
            with query ``i`` at ``i + Lk - Lq``, sequence key ``j`` at ``j`` and prefix slot ``s`` of a prompt
            of ``n`` valid slots at ``s - n`` (the prefix right before the text, as in PEFT's cache).
        softcap: ``> 0``: scores become ``softcap * tanh(score / softcap)`` after scaling (prefix keys too).
        sinks: ``[Hq]`` floating: one extra logit per q head in the softmax normaliser, with no value
            (attention sinks, gpt-oss); differentiable. A query that sees no key then gets zeros and lse
            equal to its sink.
        prefix_offsets: int ``[B]`` in ``[0, Lk]``: with a window, row ``b``'s prefix sits right before its sequence
            key ``prefix_offsets[b]`` (slot ``s`` at index ``s - n + prefix_offsets[b]``): serving passes each row's
            count of leading padding, so that a request sees the same window whatever it is batched with.
        return_lse: also return the log-sum-exp ``[B, Hq, Lq]`` (float32; float64 for float64 inputs),
            ``-inf`` for a query that sees no key. It is differentiable.
        backend: ``"auto"`` (fastest supported), ``"torch"``, ``"cpu"`` or another name from
            ``softprompt_kernels.available_backends()``.

    Returns:
        ``out [B, Hq, Lq, D]`` in q's dtype (laid out as ``[B, Lq, Hq, D]`` in memory by the fused
        backends), and ``lse`` when ``return_lse``. A query with no visible key gets zeros, never NaN,
        and zero gradients. Gradients of ``prefix_k``/``prefix_v`` for prompt ``p`` are summed over the
        rows that use it; slots past ``prefix_lens[p]`` get zero.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    check_backend_name(backend)
    inputs = validate_prefix_attention_args(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, causal,
                                            key_padding_mask, scale, window, softcap, sinks, prefix_offsets)
    chosen = select_backend("prefix_attention", inputs, backend)
    check_index_values(inputs)
    out, lse = chosen.run(inputs, return_lse)
    return (out, lse) if return_lse else out


def resolve_backend(q, k, v, prefix_k, prefix_v, *, backend: str = "auto", **kwargs) -> str:
    """The name of the backend ``prefix_attention`` would run these arguments on."""
    inputs: PrefixAttentionInputs = validate_prefix_attention_args(q, k, v, prefix_k, prefix_v, **kwargs)
    return select_backend("prefix_attention", inputs, backend).name


def not_supported_reasons(backend: str, q, k, v, prefix_k, prefix_v, **kwargs):
    """Why ``backend`` cannot run these arguments (empty list: it can)."""
    inputs = validate_prefix_attention_args(q, k, v, prefix_k, prefix_v, **kwargs)
    return get_backend(backend).not_supported_reasons(inputs)
