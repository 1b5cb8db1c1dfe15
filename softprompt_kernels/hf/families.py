"""The model families softprompt_kernels accelerates, as one table (no per-family patch code).

A family entry says what differs between families for soft prompts: whether attention is causal
(decoder) or bidirectional (encoder), and how text token positions are numbered once ``k`` prompt
positions precede them (PEFT's conventions, which the accelerated path reproduces exactly):

- ``"index"``: position = k + index in the padded sequence (RoPE and learned absolute positions
  computed from the cache position: llama, mistral, qwen2, qwen3, gemma, gpt2, gpt_neox);
- ``"mask_cumsum"``: OPT derives positions from the attention mask: k + (number of real tokens up
  to here) - 1, and -1 on padding.
- ``"encoder"``: encoders number the prompt positions 0..k-1 and the text after them (the prompt is
  inserted into the layer-0 input, so the model's own numbering applies).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Family:
    model_type: str
    causal: bool
    positions: str  # "index" | "mask_cumsum" | "encoder"


FAMILIES: Dict[str, Family] = {f.model_type: f for f in (
    Family("llama", True, "index"),
    Family("mistral", True, "index"),
    Family("qwen2", True, "index"),
    Family("qwen3", True, "index"),
    Family("gemma", True, "index"),
    Family("gpt2", True, "index"),
    Family("gpt_neox", True, "index"),
    Family("opt", True, "mask_cumsum"),
    Family("bert", False, "encoder"),
    Family("roberta", False, "encoder"),
)}


class UnsupportedModelError(ValueError):
    """The model's family is not in the table."""


def family_of(config) -> Family:
    """The table entry of a model config (its ``model_type``), or an error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by softprompt_kernels; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
