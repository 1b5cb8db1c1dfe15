"""Hugging Face integration: softprompt attention in transformers models, PEFT acceleration."""
from .accelerate import AccelerationError, accelerate, is_accelerated, restore
from .attention import ATTENTION_NAME, SoftPromptContext, register, use_softprompt_attention
from .families import FAMILIES, UnsupportedModelError, family_of

__all__ = ["accelerate", "restore", "is_accelerated", "AccelerationError", "SoftPromptContext", "register",
           "use_softprompt_attention", "ATTENTION_NAME", "FAMILIES", "UnsupportedModelError", "family_of"]
