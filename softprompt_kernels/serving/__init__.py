"""Serving many soft prompts on one frozen model: the adapter bank, batched generation, an HTTP server."""
from ..adapters import AdapterError
from .bank import PromptBank, generate

__all__ = ["PromptBank", "AdapterError", "generate"]
