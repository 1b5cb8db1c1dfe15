"""Resuming prompt-learning training from a saved adapter (PEFT refuses ``is_trainable=True`` for them).

A PEFT prompt adapter on disk is ``adapter_config.json`` + ``adapter_model.safetensors`` whose one key
``prompt_embeddings`` is what the prompt encoder produced: the embeddings themselves for prompt
tuning and un-projected prefix tuning (so resuming from them is exact), but only the encoder's
*output* for P-tuning and projected prefix tuning. ``save_trainable`` writes PEFT's two files plus
``softprompt_encoder.safetensors`` with the whole encoder, so that ``load_trainable`` resumes those
exactly too. Everything is read with safetensors (never pickle).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import compat

ENCODER_FILE = "softprompt_encoder.safetensors"


def save_trainable(peft_model, directory: str) -> None:
    """PEFT's ``save_pretrained`` plus the full prompt encoder (for exact resumption)."""
    from safetensors.torch import save_file

    peft_model.save_pretrained(directory)
    encoder = compat.prompt_encoder(peft_model)
    state = {name: tensor.detach().contiguous() for name, tensor in encoder.state_dict().items()}
    save_file(state, os.path.join(directory, ENCODER_FILE))


def load_trainable(base_model, directory: str, adapter_name: str = "default"):
    """A trainable PEFT model resumed from ``directory`` (written by PEFT or by ``save_trainable``)."""
    from peft import PeftConfig, get_peft_model
    from safetensors.torch import load_file

    config_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no adapter_config.json in {directory!r}")
    config = PeftConfig.from_pretrained(directory)
    if not config.is_prompt_learning:
        raise ValueError(f"{directory!r} holds a {compat.peft_type_name(config)} adapter, not a prompt-learning one")
    config.inference_mode = False
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    encoder = compat.prompt_encoder(model, adapter_name)
    weight = compat.prompt_encoder_weight(encoder)
    encoder_path = os.path.join(directory, ENCODER_FILE)
    if os.path.isfile(encoder_path):
        encoder.load_state_dict(load_file(encoder_path, device=str(weight.device)))
        return model
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory!r} (only safetensors is read)")
    saved = load_file(weights_path)
    if "prompt_embeddings" not in saved:
        raise ValueError(f"{weights_path} has no 'prompt_embeddings' tensor (keys: {sorted(saved)})")
    embeddings = saved["prompt_embeddings"]
    method = compat.peft_type_name(config)
    if getattr(config, "prefix_projection", False) or method == "P_TUNING":
        raise ValueError(
            f"{directory!r} holds only the output of a {method} encoder, not the encoder: resuming it "
            "exactly needs a checkpoint written by softprompt_kernels.hf.save_trainable")
    if tuple(embeddings.shape) != tuple(weight.shape):
        raise ValueError(f"prompt_embeddings has shape {tuple(embeddings.shape)}, the model expects "
                         f"{tuple(weight.shape)} (an adapter made for another model?)")
    with torch.no_grad():
        weight.copy_(embeddings.to(weight))
    if len(saved) > 1:
        warnings.warn(f"ignoring tensors other than prompt_embeddings in {weights_path}: {sorted(saved)}")
    return model
