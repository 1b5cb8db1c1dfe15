"""Toy PEFT adapters of every servable kind over a model directory (nothing downloaded): the vLLM plugin's
tests and its serving benchmark use them. Each adapter's parameters are drawn large enough that it changes
the model's tokens, so a server that ignored it would fail the comparison."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional, Tuple

# name -> (PEFT config class name, options); k differs per adapter so that lengths mix in one batch
KINDS: Dict[str, Tuple[str, dict]] = {
    "prompt5": ("PromptTuningConfig", {"num_virtual_tokens": 5}),
    "ptune_mlp4": ("PromptEncoderConfig", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "MLP",
                                           "encoder_hidden_size": 32}),
    "ptune_lstm3": ("PromptEncoderConfig", {"num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM",
                                            "encoder_hidden_size": 32}),
    "prefix4": ("PrefixTuningConfig", {"num_virtual_tokens": 4}),
    "prefix_proj6": ("PrefixTuningConfig", {"num_virtual_tokens": 6, "prefix_projection": True,
                                            "encoder_hidden_size": 32}),
    "cartridge3": ("CartridgeConfig", {"num_virtual_tokens": 3, "num_frozen_tokens": 1}),
    "multitask4": ("MultitaskPromptTuningConfig", {"num_virtual_tokens": 4, "num_tasks": 2, "num_ranks": 2}),
}


def make_adapter(base, kind: str, seed: int, num_virtual_tokens: Optional[int] = None):
    import peft
    import torch

    config_class, options = KINDS[kind]
    if num_virtual_tokens is not None:
        options = {**options, "num_virtual_tokens": num_virtual_tokens}
    model = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_class)(task_type="CAUSAL_LM", **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.7 if kind.startswith("multitask") else 0.5, generator=generator)
    return model.eval()


def save_adapters(base, directory, kinds=tuple(KINDS), copies: int = 1) -> Dict[str, Tuple[object, str]]:
    """``{name: (peft model, saved directory)}``; with ``copies`` > 1, names ``kind-i`` (distinct weights)."""
    out = {}
    for c in range(copies):
        for i, kind in enumerate(kinds):
            name = kind if copies == 1 else f"{kind}-{c}"
            model = make_adapter(base, kind, seed=1000 * c + i)
            path = Path(directory) / name
            model.save_pretrained(str(path))
            out[name] = (model, str(path))
    return out
