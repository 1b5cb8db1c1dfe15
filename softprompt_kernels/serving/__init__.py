"""Serving many soft prompts on one frozen model: the adapter bank, batched generation, an HTTP server."""
from .bank import AdapterError, PromptBank
from .generate import generate

PromptBank.generate = generate  # bank.generate(input_ids, attention_mask, adapters=[...], ...)

__all__ = ["PromptBank", "AdapterError", "generate"]
