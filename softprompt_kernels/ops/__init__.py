"""The ops: ``prefix_attention`` and ``insert_prompt``, one package each (contract, validation, reference, one module
per backend), and what they share: the contract machinery (contract.py), the backend registry (backends.py) and
the C++ extension (extension.py)."""
from .backends import PRIORITY, PerformanceWarning, available_backends, backend_status
from .insert_prompt import insert_prompt, insert_prompts
from .prefix_attention import not_supported_reasons, prefix_attention, resolve_backend
from .prefix_attention.triton import prefix_grad_mode, set_prefix_grad_mode

__all__ = ["prefix_attention", "insert_prompt", "insert_prompts", "resolve_backend", "not_supported_reasons",
           "available_backends", "backend_status", "PRIORITY", "PerformanceWarning", "prefix_grad_mode",
           "set_prefix_grad_mode"]
