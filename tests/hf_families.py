"""Tiny random causal LMs of any transformers family, built programmatically from its default config.

``tiny_causal_lm(model_type)`` takes the family's default config, shrinks every size it has (hidden
size, layers, heads, experts, vocabulary) and switches dropout off; where the family has the features
of docs/DESIGN.md section 2 it makes them matter: a sliding window shorter than prefix + text, strong
logit soft-capping, alternating sliding/full layers. Nothing is downloaded.
"""
from __future__ import annotations

import torch

VOCAB = 97
WINDOW = 6       # shorter than k + text in the tests (k = 5, text 9), longer than their padding runs (5)
SOFTCAP = 0.05   # the random models' scores are ~0.1: a cap this small changes them a lot
INIT_STD = 0.2   # larger than the default 0.02, so that attention is far from uniform

SIZES = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "intermediate_size": 96, "n_inner": 96, "ffn_dim": 96,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "top_k": 2, "moe_topk": 2, "n_shared_experts": 1,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256,
    "initializer_range": INIT_STD, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
    "word_embed_proj_dim": 64, "rotary_dim": 8, "partial_rotary_factor": 0.5,
    "first_k_dense_replace": 0, "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
}
FEATURES = {"sliding_window": WINDOW, "attn_logit_softcapping": SOFTCAP}


def _zero_dropouts(config) -> None:
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name.endswith("_prob")):
            setattr(config, name, 0.0)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    for name, value in SIZES.items():
        if hasattr(text, name):
            setattr(text, name, value)
    for name, value in FEATURES.items():  # where the family has the feature at all (phi3: window None by default)
        if name in ("sliding_window",) and hasattr(text, name) or getattr(text, name, None) is not None:
            setattr(text, name, value)
    if getattr(text, "use_sliding_window", None) is False and hasattr(text, "sliding_window"):
        text.use_sliding_window, text.sliding_window, text.max_window_layers = True, WINDOW, 0
    layer_types = getattr(text, "layer_types", None)
    if layer_types:  # keep the family's kinds of layers, two of them: a sliding one first where it has one
        kinds = list(dict.fromkeys(layer_types))
        text.layer_types = (kinds * 2)[:2] if len(kinds) > 1 else kinds * 2
    if hasattr(text, "rope_scaling") and isinstance(text.rope_scaling, dict) and "mrope_section" in text.rope_scaling:
        text.rope_scaling = None  # multimodal rotary sections: not for a text-only tiny model
    _zero_dropouts(text)
    for name, value in overrides.items():
        setattr(text, name, value)
    return config


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """The family's causal LM on SDPA attention, or eager attention where the family has no SDPA path
    (soft-capping, sinks)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        except ValueError as exc:
            if "does not support an attention implementation" not in str(exc):
                raise
            continue
        return model.float().eval()
    raise ValueError(f"{model_type}: neither SDPA nor eager attention")
