"""Serving many soft prompts on one frozen model: the adapter bank, batched generation, an HTTP server.

Loaded on first use, as the package root is: ``softprompt-kernels serve`` (serving/cli.py) then builds its
parser without importing transformers, and can name the extra to install when a dependency is missing.
"""
_LAZY = {"PromptBank": "bank", "AdapterError": "bank", "generate": "bank"}


def __getattr__(name):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["PromptBank", "AdapterError", "generate"]
