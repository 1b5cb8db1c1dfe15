"""The contract of ``prefix_attention`` (docs/DESIGN.md section 2): its arguments, written once.

Everything else derives from :data:`ARGS`: the public function (ops/prefix_attention/__init__.py), the validated
record :class:`PrefixAttentionInputs`, the schemas of the compiled op pairs (C++ ``prefix_attention_fwd/bwd``,
Triton ``triton_prefix_attention_fwd/bwd``), their fake kernels (below) and autograd (autograd.py). Adding an
argument: an entry here, its check in validation.py, its math in reference.py, and the kernels that take it (or
a refusal in their backend's ``not_supported_reasons``).
"""
from __future__ import annotations

import torch

from ...common import accumulation_dtype
from ..contract import Arg, OpContract, size_of

ARGS = (
    Arg("q", "Tensor", "[B, Hq, Lq, D] queries; any strides with a contiguous last dim (Hugging Face's transposed "
        "views are taken as they are).", grad="kernel"),
    Arg("k", "Tensor", "[B, Hkv, Lk, D] sequence keys: Lq <= Lk (or Lk = 0 with causal=False and no window: "
        "prefix-only attention, a separate softmax over the prompt) and Hq % Hkv == 0 (q head h reads kv head "
        "h // (Hq // Hkv)).", grad="kernel"),
    Arg("v", "Tensor", "[B, Hkv, Lk, D] sequence values.", grad="kernel"),
    Arg("prefix_k", "Tensor", "[P, Hkv, K, D] a bank of P prefixes of K slots (K may be 0).", grad="kernel"),
    Arg("prefix_v", "Tensor", "[P, Hkv, K, D] the prefixes' values.", grad="kernel"),
    Arg("prompt_ids", "Tensor?", "int [B] in [-1, P): the prefix of each row, -1 for none; None needs P == 1.",
        default=None),
    Arg("prefix_lens", "Tensor?", "int [P] in [0, K]: prompt p uses its first prefix_lens[p] slots (None: all K).",
        default=None),
    Arg("causal", "bool", "sequence key j is visible to query i iff j <= i + (Lk - Lq) (bottom-right aligned, so "
        "decoding and chunked prefill are the same op). The prefix is never masked.", default=True),
    Arg("key_padding_mask", "Tensor?", "bool [B, Lk], True = real token; any padding pattern.", default=None),
    Arg("scale", "float", "softmax scale, default D ** -0.5.", default=None, public_type="float?"),
    Arg("window", "int?", "sliding window >= 1: a key is visible only if index(query) - index(key) < window, with "
        "query i at i + Lk - Lq, sequence key j at j and prefix slot s of a prompt of n valid slots at s - n (the "
        "prefix right before the text, as in PEFT's cache).", default=None),
    Arg("softcap", "float?", "> 0: scores become softcap * tanh(score / softcap) after scaling (prefix keys too).",
        default=None),
    Arg("sinks", "Tensor?", "[Hq] floating: one extra logit per q head in the softmax normaliser, with no value "
        "(attention sinks, gpt-oss); differentiable. A query that sees no key then gets zeros and lse equal to "
        "its sink.", default=None, grad="formula"),
    Arg("prefix_offsets", "Tensor?", "int [B] in [0, Lk]: with a window, row b's prefix sits right before its "
        "sequence key prefix_offsets[b] (slot s at index s - n + prefix_offsets[b]): serving passes each row's "
        "count of leading padding, so that a request sees the same window whatever it is batched with.",
        default=None),
    Arg("cu_seqlens", "Tensor?", "int [S + 1]: variable-length rows (FlashAttention's varlen layout) with B = 1 "
        "and Lq = Lk = total: sequence s owns tokens cu_seqlens[s] .. cu_seqlens[s + 1] - 1 and attends to itself "
        "only (causal inside it, its queries and keys indexed from 0 for the window) and to its own prompt's "
        "prefix; prompt_ids and prefix_offsets are then per sequence [S]. Packed (padding-free) training: each "
        "sequence gets exactly what it would get alone.", default=None),
    Arg("dropout_p", "float", "attention dropout probability (training); only the torch backend has dropout, so "
        "auto runs it there (with a PerformanceWarning naming why).", default=0.0, kernel=False),
)
# Call options: not arguments of the computation.
OPTIONS = (
    Arg("return_lse", "bool", "also return the log-sum-exp [B, Hq, Lq] (float32; float64 for float64 inputs), "
        "-inf for a query that sees no key. It is differentiable.", default=False),
    Arg("backend", "str", "'auto' (fastest supported), 'torch', 'cpu' or another name from "
        "softprompt_kernels.available_backends().", default="auto"),
)
CONTRACT = OpContract("prefix_attention", ARGS, outputs=("out", "lse"))

# The backward ops: (grad_out, grad_lse, out, lse, <the forward's arguments>, seq_grads, prefix_grads) -> the
# gradients the kernels compute. seq_grads / prefix_grads come from autograd's needs_input_grad (q, k or v; prefix_k
# or prefix_v): the kernels skip the work of gradients nobody asked for and return those empty, shape [0].
BACKWARD_LEADING = (Arg("grad_out", "Tensor", "[B, Hq, Lq, D]"), Arg("grad_lse", "Tensor?", "[B, Hq, Lq]"),
                    Arg("out", "Tensor", "[B, Hq, Lq, D]"), Arg("lse", "Tensor", "[B, Hq, Lq]"))
BACKWARD_TRAILING = (Arg("seq_grads", "bool", "compute dq, dk, dv", default=True),
                     Arg("prefix_grads", "bool", "compute dprefix_k, dprefix_v", default=True))
KERNEL_GRADS = tuple(a.name for a in ARGS if a.grad == "kernel")  # q, k, v, prefix_k, prefix_v
SEQUENCE_GRADS = ("q", "k", "v")
BACKWARD_OUTPUTS = tuple(f"grad_{name}" for name in KERNEL_GRADS)

FORWARD_SCHEMA = CONTRACT.schema()
BACKWARD_SCHEMA = CONTRACT.schema(BACKWARD_LEADING, BACKWARD_TRAILING, returns=BACKWARD_OUTPUTS)


class _Sizes:
    """The sizes of a validated call, read off its tensors."""

    batch = size_of("q", 0, "B")
    heads_q = size_of("q", 1, "Hq")
    heads_kv = size_of("k", 1, "Hkv")
    len_q = size_of("q", 2, "Lq")
    len_k = size_of("k", 2, "Lk")
    num_prompts = size_of("prefix_k", 0, "P")
    prefix_slots = size_of("prefix_k", 2, "K")
    head_dim = size_of("q", 3, "D")
    device = property(lambda inputs: inputs.q.device)
    dtype = property(lambda inputs: inputs.q.dtype)


PrefixAttentionInputs = CONTRACT.inputs_class("PrefixAttentionInputs", _Sizes)
PrefixAttentionInputs.__doc__ = "Validated arguments of one prefix_attention call (one field per contract argument)."


# --- fake kernels: the shapes of every backend's op pair


def _bshd_like(shape, like: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, L, D] tensor laid out as [B, L, H, D], as the kernels allocate it."""
    B, H, L, D = shape
    return like.new_empty((B, L, H, D)).transpose(1, 2)


def forward_fake(*args, **kwargs):
    """(out [B, Hq, Lq, D] laid out [B, Lq, Hq, D], lse [B, Hq, Lq] in the accumulation dtype)."""
    q = CONTRACT.named(args, kwargs)["q"]
    return _bshd_like(q.shape, q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


def backward_fake(*args, extra=(), **kwargs):
    """The kernel gradients; those that seq_grads / prefix_grads turn off come back empty, shape [0]."""
    named = CONTRACT.named(args, kwargs, BACKWARD_LEADING, (*BACKWARD_TRAILING, *extra))
    grads = []
    for name in KERNEL_GRADS:
        wanted = named["seq_grads"] if name in SEQUENCE_GRADS else named["prefix_grads"]
        like = named[name]
        if not wanted:
            grads.append(like.new_empty(0))
        elif name in SEQUENCE_GRADS:
            grads.append(_bshd_like(like.shape, like))
        else:
            grads.append(torch.empty_like(like, memory_format=torch.contiguous_format))
    return tuple(grads)
