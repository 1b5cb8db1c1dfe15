"""Serving many soft prompts on one frozen model: the adapter bank, batched generation, an HTTP server."""
from ..adapters import AdapterError
from .bank import PromptBank
from .generate import generate

PromptBank.generate = generate  # bank.generate(input_ids, attention_mask, adapters=[...], ...)

__all__ = ["PromptBank", "AdapterError", "generate"]
