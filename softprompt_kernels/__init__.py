"""softprompt-kernels: fused kernels and PyTorch ops for soft-prompt methods over frozen models."""
from ._version import __version__
from .errors import BackendNotSupportedError, InvalidArgumentError, InvalidDtypeError
from .ops import (PRIORITY, PerformanceWarning, available_backends, backend_status, insert_prompt,
                  not_supported_reasons, prefix_attention, prefix_grad_mode, resolve_backend, set_prefix_grad_mode)

# Loaded on first use: the Hugging Face layer imports transformers and PEFT.
_LAZY = {"hf": None, "PromptBank": "serving", "AdapterError": "serving", "accelerate": "hf", "restore": "hf",
         "is_accelerated": "hf", "AccelerationError": "hf"}


def __getattr__(name):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'softprompt_kernels' has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "prefix_attention",
    "insert_prompt",
    "available_backends",
    "backend_status",
    "PRIORITY",
    "set_prefix_grad_mode",
    "prefix_grad_mode",
    "resolve_backend",
    "not_supported_reasons",
    "InvalidArgumentError",
    "InvalidDtypeError",
    "BackendNotSupportedError",
    "PerformanceWarning",
    "accelerate",
    "restore",
    "is_accelerated",
    "AccelerationError",
    "PromptBank",
    "AdapterError",
    "__version__",
]
