"""Hugging Face integration: softprompt attention in transformers models, PEFT acceleration.

Importing it checks once that torch, transformers, PEFT and triton are within the tested ranges
(softprompt_kernels/versions.py): a warning names any version outside them.
"""
from ..versions import check_tested_versions

check_tested_versions()

from .accelerate import AccelerationError, accelerate, is_accelerated, restore  # noqa: E402
from .attention import ATTENTION_NAME, SoftPromptContext, register, use_softprompt_attention  # noqa: E402
from .checkpoints import load_trainable, save_trainable  # noqa: E402
from .families import EXCEPTIONS, UnsupportedModelError, family_of, unsupported_reason  # noqa: E402
from .sharding import full_prompt_parameters, is_sharded, save_adapter  # noqa: E402

__all__ = ["accelerate", "restore", "save_trainable", "load_trainable", "is_accelerated", "AccelerationError",
           "SoftPromptContext", "register", "use_softprompt_attention", "ATTENTION_NAME", "EXCEPTIONS", "unsupported_reason",
           "UnsupportedModelError", "family_of", "save_adapter", "full_prompt_parameters", "is_sharded"]
