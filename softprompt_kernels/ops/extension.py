"""The C++ extension ``softprompt_kernels._C``: loading it registers the CPU (and CUDA) kernels of the ops.

The ops' schemas are defined from Python, from each op's contract (ops/*/contract.py); the C++ kernels are boxed
and read their arguments by name (csrc/op_args.h), so they register before their schemas exist and never depend on
the argument order. Without the extension the package stays usable with the torch backends.
"""
from __future__ import annotations

from typing import Optional

import torch

NAMESPACE = "softprompt_kernels"

try:
    from .. import _C  # noqa: F401  (loading it registers the kernels)

    EXTENSION_ERROR: Optional[str] = None
except ImportError as exc:
    _C = None
    EXTENSION_ERROR = f"the C++ extension softprompt_kernels._C is not built or failed to load ({exc})"


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def define(name: str, schema: str) -> None:
    """Defines ``softprompt_kernels::name`` with ``schema`` (once per process)."""
    torch.library.define(f"{NAMESPACE}::{name}", schema)


def kernel_status(op: str, device_type: str) -> Optional[str]:
    """None when the extension has a ``device_type`` kernel for ``softprompt_kernels::op``, else why not."""
    if _C is None:
        return EXTENSION_ERROR
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", device_type.upper()):
        return f"the C++ extension was built without {device_type.upper()} kernels for {op}"
    return None
