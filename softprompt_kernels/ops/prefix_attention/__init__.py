"""The public ``prefix_attention`` op (docs/DESIGN.md section 2).

One package holds the op: contract.py (its arguments, written once: the public signature below, the compiled ops'
schemas, fake kernels), validation.py, autograd.py, reference.py (the ``torch`` backend: PEFT's expand + cat +
SDPA), and one module per fused backend: cpu.py (the C++ op pair, ``cpu``), cuda.py (``cuda``), triton.py
(``triton``). Each backend registers itself with the one registry (ops/backends.py).
"""
from __future__ import annotations

from typing import List

from ..backends import check_backend_name, get_backend, select_backend
from . import cpu, cuda, reference, triton  # noqa: F401  (each registers its backend)
from .contract import CONTRACT, OPTIONS, PrefixAttentionInputs
from .validation import check_index_values, validate

__all__ = ["prefix_attention", "resolve_backend", "not_supported_reasons", "validate", "PrefixAttentionInputs"]


def _prefix_attention(return_lse: bool, backend: str, **arguments):
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    check_backend_name(backend)
    inputs = validate(**arguments)
    chosen = select_backend("prefix_attention", inputs, backend)
    check_index_values(inputs)
    out, lse = chosen.run(inputs, return_lse)
    return (out, lse) if return_lse else out


prefix_attention = CONTRACT.public_function(
    _prefix_attention, OPTIONS, module=__name__,
    doc="""Attention over a shared bank of soft-prompt prefixes plus each row's own keys.

    Returns ``out [B, Hq, Lq, D]`` in q's dtype (laid out as ``[B, Lq, Hq, D]`` in memory by the fused backends),
    and ``lse`` when ``return_lse``. A query with no visible key gets zeros, never NaN, and zero gradients.
    Gradients of ``prefix_k``/``prefix_v`` for prompt ``p`` are summed over the rows that use it; slots past
    ``prefix_lens[p]`` get zero. Bad arguments raise InvalidArgumentError / InvalidDtypeError naming the argument.""")


def resolve_backend(q, k, v, prefix_k, prefix_v, *, backend: str = "auto", **arguments) -> str:
    """The name of the backend ``prefix_attention`` would run these arguments on."""
    inputs = validate(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, **arguments)
    return select_backend("prefix_attention", inputs, backend).name


def not_supported_reasons(backend: str, q, k, v, prefix_k, prefix_v, **arguments) -> List[str]:
    """Why ``backend`` cannot run these arguments (empty list: it can)."""
    inputs = validate(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, **arguments)
    return get_backend(backend).not_supported_reasons(inputs)
