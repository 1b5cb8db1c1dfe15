"""Which models softprompt_kernels accelerates: by capability, with a table of true exceptions only.

A causal decoder is accelerated when its attention goes through transformers' AttentionInterface and
the op can express it: grouped-query attention, sliding windows (per layer, as the layer passes them),
logit soft-capping and attention sinks; whatever a model does to q and k before attention (RoPE,
partial rotary, QK-norm) is its own business. What the op cannot express is refused by name with the
reason (:func:`unsupported_reason`): hybrid or linear-attention layers, different K and V head dims
(multi-head latent attention), ALiBi, encoder-decoder models.

A :class:`Family` says what differs for soft prompts: whether attention is causal (decoder) or
bidirectional (encoder), and how text positions are numbered once ``k`` prompt positions precede them
(PEFT's conventions, which the accelerated path reproduces exactly):

- ``"index"`` (every decoder unless listed): position = k + index in the padded sequence;
- ``"mask_cumsum"``: OPT derives positions from the attention mask: k + (real tokens up to here) - 1,
  and -1 on padding;
- ``"padding_cumsum"``: RoBERTa numbers real tokens from ``padding_idx + 1`` by counting them, and gives
  padding ``padding_idx``; with a k-slot prefix the count starts at k.

For encoders these rules apply to prefix tuning (P-Tuning v2), numbered as transformers 4.x numbered
text after a k-slot cache; with prompt/P-tuning the prompt is inserted into the layer-0 input and the
model numbers the whole sequence itself, exactly as PEFT does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..common import warn_once
from . import compat


@dataclass(frozen=True)
class Family:
    model_type: str
    causal: bool
    positions: str  # "index" | "mask_cumsum" | "padding_cumsum"


# The exceptions: position numbering that is not "index", and the encoders (bidirectional attention).
EXCEPTIONS: Dict[str, Family] = {f.model_type: f for f in (
    Family("opt", True, "mask_cumsum"),
    Family("bert", False, "index"),
    Family("roberta", False, "padding_cumsum"),
)}

# Causal-LM families whose parity with PEFT is tested (tests/test_hf_family_matrix.py; the README's
# support table is generated from the same list by benchmarks/support_table.py). Others that pass the
# capability checks are accelerated too, with a warning once that they are untested.
TESTED_DECODERS = frozenset({
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "bitnet", "codegen", "cohere", "cohere2",
    "cohere2_moe", "ctrl", "dots1", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flex_olmo",
    "gemma", "gemma2", "gemma3_text", "glm", "glm4", "glm4_moe", "gpt-sw3", "gpt2", "gpt_neox", "gpt_oss", "gptj",
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "kolibri1", "laguna", "llama",
    "mellum", "minimax_m2", "ministral", "ministral3", "mistral", "mixtral", "nanochat", "olmo",
    "olmo2", "olmo3", "olmoe", "opt", "persimmon", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "sarvam_moe", "seed_oss", "smollm3", "solar_open", "starcoder2", "vaultgemma",
})

# Families that pass the capability checks but whose attention the op does not reproduce: refused by name.
REFUSED: Dict[str, str] = {
    "diffllama": "differential attention (two softmax maps per head, subtracted) is not one softmax over the keys",
    "doge": "dynamic mask attention adds a learned bias to a 4D attention mask, which the op does not take",
    "bert-generation": "its prompt-tuning results differ from PEFT's in the parity check (not yet understood)",
    "nemotron": "its prompt-tuning results differ from PEFT's in the parity check (not yet understood)",
    "dory": "its attention layers failed in the parity check (sequence lengths of its cache do not line up)",
    "hrm_text": "its recurrent reasoning modules call the layers in a pattern the per-layer prefixes do not follow",
    "jetmoe": "its mixture-of-attention heads give prefix tuning a key/value head count PEFT and the model disagree on",
    "mimo_v2_flash": "its keys and values have different head dims",
}

# Layer types the op expresses (transformers' config.layer_types).
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


class UnsupportedModelError(ValueError):
    """The model cannot be accelerated; the message names the model type and the reason."""


def unsupported_reason(config, model=None, model_class=None) -> Optional[str]:
    """Why the op cannot express this model's attention (None: it can). The model (or its class) adds the
    check that its attention goes through AttentionInterface."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (decoder-only causal LMs and BERT/RoBERTa encoders are)"
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        return REFUSED[model_type]
    layer_types = set(getattr(config, "layer_types", None) or ())
    other_layers = sorted(layer_types - ATTENTION_LAYER_TYPES)
    if other_layers:
        return (f"it has layers of type {other_layers}: hybrid, linear, chunked or recurrent attention is not "
                "softmax attention over the prefix and the keys, which is all the op computes")
    if getattr(config, "block_types", None) or getattr(config, "layers_block_type", None):
        return "it has recurrent or state-space blocks (a model-specific cache the op cannot hold)"
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        return ("it uses multi-head latent attention (kv_lora_rank): its keys and values have different head dims, "
                "and the op takes K and V of one head dim")
    v_dim, qk_dim = getattr(config, "v_head_dim", None), getattr(config, "qk_head_dim", None)
    if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
        return f"its keys and values have different head dims ({qk_dim} and {v_dim})"
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False) \
            or model_type == "bloom":
        return "it uses ALiBi position biases, which the op does not add to the scores"
    if compat.is_masked_lm_family(model_type):
        return ("it is a bidirectional encoder: of those, BERT and RoBERTa are supported (other encoders number "
                "positions after a prefix in ways not yet checked against PEFT)")
    model_class = type(model) if model is not None else model_class
    if model_class is not None and model_type not in EXCEPTIONS:
        if not getattr(model_class, "_supports_attention_backend", False):
            return ("its attention does not go through transformers' AttentionInterface, so softprompt "
                    "attention cannot be plugged in")
    return None


def family_of(config, model=None) -> Family:
    """The family of a model config (and, when given, its model class), or UnsupportedModelError with the reason."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    if model_type in EXCEPTIONS:
        return EXCEPTIONS[model_type]
    reason = unsupported_reason(text_config, model)
    if reason is not None:
        raise UnsupportedModelError(f"model_type {model_type!r} cannot be accelerated: {reason}")
    if model_type not in TESTED_DECODERS:
        warn_once(("untested family", model_type),
                  f"model_type {model_type!r} passes softprompt_kernels' capability checks but is not in its tested "
                  f"parity matrix: check its results against PEFT once (tested: {sorted(TESTED_DECODERS)})")
    return Family(model_type, True, "index")
