"""Hugging Face integration: softprompt attention in transformers models, PEFT acceleration."""
from .accelerate import AccelerationError, accelerate, is_accelerated, restore
from .checkpoints import load_trainable, save_trainable
from .attention import ATTENTION_NAME, SoftPromptContext, register, use_softprompt_attention
from .families import FAMILIES, UnsupportedModelError, family_of

__all__ = ["accelerate", "restore", "save_trainable", "load_trainable", "is_accelerated", "AccelerationError", "SoftPromptContext", "register",
           "use_softprompt_attention", "ATTENTION_NAME", "FAMILIES", "UnsupportedModelError", "family_of"]
