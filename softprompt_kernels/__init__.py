"""softprompt-kernels: fused kernels and PyTorch ops for soft-prompt methods over frozen models."""
from ._validation import BackendNotSupportedError, InvalidArgumentError, InvalidDtypeError
from .attention import not_supported_reasons, prefix_attention, resolve_backend
from .insertion import insert_prompt
from .backends import PerformanceWarning, available_backends, backend_status
from .triton.op import prefix_grad_mode, set_prefix_grad_mode  # registers the triton backend
from . import cuda_backend as _cuda_backend  # noqa: F401  (registers the cuda backend)


def __getattr__(name):
    # The Hugging Face integration imports transformers: load it on first use only.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    if name in ("PromptBank", "AdapterError"):
        from . import serving

        return getattr(serving, name)
    if name in ("accelerate", "restore", "is_accelerated", "AccelerationError"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'softprompt_kernels' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "prefix_attention",
    "insert_prompt",
    "available_backends",
    "backend_status",
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
