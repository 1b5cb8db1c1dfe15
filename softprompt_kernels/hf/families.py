"""The model families softprompt_kernels accelerates, as one table (no per-family patch code).

A family entry says what differs between families for soft prompts: whether attention is causal
(decoder) or bidirectional (encoder), and how text token positions are numbered once ``k`` prompt
positions precede them (PEFT's conventions, which the accelerated path reproduces exactly):

- ``"index"``: position = k + index in the padded sequence (RoPE and learned absolute positions
  computed from the cache position: llama, mistral, qwen2, qwen3, gemma, gpt2, gpt_neox);
- ``"mask_cumsum"``: OPT derives positions from the attention mask: k + (number of real tokens up
  to here) - 1, and -1 on padding.
- ``"padding_cumsum"``: RoBERTa numbers real tokens from ``padding_idx + 1`` by counting them, and
  gives padding ``padding_idx``; with a k-slot prefix the count starts at k.

For encoders these rules apply to prefix tuning (P-Tuning v2), numbered as transformers 4.x numbered
text after a k-slot cache; with prompt/P-tuning the prompt is inserted into the layer-0 input and
the model numbers the whole sequence itself, exactly as PEFT does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Family:
    model_type: str
    causal: bool
    positions: str  # "index" | "mask_cumsum" | "padding_cumsum"


FAMILIES: Dict[str, Family] = {f.model_type: f for f in (
    Family("llama", True, "index"),
    Family("mistral", True, "index"),
    Family("qwen2", True, "index"),
    Family("qwen3", True, "index"),
    Family("gemma", True, "index"),
    Family("gpt2", True, "index"),
    Family("gpt_neox", True, "index"),
    Family("opt", True, "mask_cumsum"),
    Family("bert", False, "index"),
    Family("roberta", False, "padding_cumsum"),
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
