"""Adapter registration shared by every server: a PEFT prompt-learning adapter becomes per-layer K/V.

One path for PromptBank (the built-in server) and the vLLM plugin (softprompt_kernels/vllm): read the PEFT
directory with safetensors only, check it against the model's shape, and turn it into each layer's prefix
keys and values. Prefix tuning and Cartridges already are K/V (PEFT's table ``[k, layers * 2 * Hkv * D]``);
prompt tuning and P-tuning tables (``[k, hidden]``; PEFT saves a P-tuning encoder's output) are run through
the frozen model once (the shared-prompt reformulation, docs/DESIGN.md section 3); a multitask adapter is one
prompt per task (PEFT's ``embedding * (cols[t] @ rows[t])``), served as ``name:task``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .hf import compat


class AdapterError(ValueError):
    """An adapter cannot be added: made for another model, unreadable, or a duplicate name."""


# PEFT types that cannot be served as a K/V prefix, with the reason (answered by name at registration).
UNSERVABLE = {
    "ADAPTION_PROMPT": "adaption prompts add a gated attention with its own softmax on the top layers; "
                       "a shared K/V prefix cannot represent it",
    "CPT": "CPT is a training method (its loss); serve the trained prompt as a PROMPT_TUNING adapter",
}


@dataclass(frozen=True)
class ModelShape:
    """What an adapter must match: the frozen model's attention geometry."""
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model_or_config) -> "ModelShape":
        config = compat.text_config(model_or_config)
        heads = config.num_attention_heads
        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


@dataclass
class AdapterKV:
    keys: torch.Tensor    # [layers, Hkv, k, D]
    values: torch.Tensor  # [layers, Hkv, k, D]
    kind: str             # "prompt" | "prefix": how it was made (for information)

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass
class AdapterSource:
    """A PEFT adapter read from disk or from a model, not yet turned into K/V."""
    method: str                     # PEFT's peft_type name
    tables: Dict[str, torch.Tensor]  # "" -> [k, width]; a multitask adapter: task index (str) -> [k, hidden]
    config: object                  # the PeftConfig

    @property
    def kind(self) -> str:
        return "prefix" if self.method in compat.KV_PREFIX_TYPES else "prompt"

    @property
    def num_virtual_tokens(self) -> int:
        return next(iter(self.tables.values())).shape[0]

    def served_names(self, name: str) -> Dict[str, str]:
        """Served name -> table key: ``name`` itself, or ``name:task`` for each task of a multitask adapter."""
        if self.method == "MULTITASK_PROMPT_TUNING":
            return {f"{name}:{task}": task for task in self.tables}
        return {name: ""}


# PromptRunner: (prompt [1, k, hidden]) -> per-layer [(keys [1, Hkv, k, D], values)] of the frozen model
PromptRunner = Callable[[torch.Tensor], List]


def read_peft_directory(directory: str) -> AdapterSource:
    """An adapter directory saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from peft import PeftConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    config_path = os.path.join(directory, "adapter_config.json")
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"missing {os.path.basename(path)} in {directory!r} (adapters are read with "
                               f"safetensors only)")
    try:
        with open(config_path) as f:
            json.load(f)
        config = PeftConfig.from_pretrained(directory)
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterError(f"unreadable adapter_config.json in {directory!r}: {exc}") from exc
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"corrupt adapter_model.safetensors in {directory!r}: {exc}") from exc
    return _source(compat.peft_type_name(config), tensors, config, where=weights_path)


def source_of_peft_model(peft_model) -> AdapterSource:
    """The active adapter of a PEFT model, as it would be saved."""
    from .hf.prompts import prompt_encoder_output, task_prompts

    config = compat.active_config(peft_model)
    method = compat.peft_type_name(config)
    if method in UNSERVABLE:
        raise AdapterError(f"peft_type {method} cannot be served: {UNSERVABLE[method]}")
    with torch.no_grad():
        if method == "MULTITASK_PROMPT_TUNING":  # every task's prompt from PEFT's encoder
            tasks = torch.arange(config.num_tasks, device=next(peft_model.parameters()).device)
            prompts, _ = task_prompts(peft_model, peft_model.get_base_model(), tasks)
            return AdapterSource(method, {str(t): prompts[t].detach() for t in range(config.num_tasks)}, config)
        tensors = {"prompt_embeddings": prompt_encoder_output(peft_model).detach()}
    return _source(method, tensors, config, where="the PEFT model")


def source_of_tensor(table: torch.Tensor, kind: str) -> AdapterSource:
    """A bare table: ``kind`` "prompt" (``[k, hidden]``) or "prefix" (``[k, layers * 2 * Hkv * D]``)."""
    return _source("PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING", {"prompt_embeddings": table}, None,
                   where="the tensor")


def _source(method: str, tensors: Dict[str, torch.Tensor], config, where: str) -> AdapterSource:
    if method in UNSERVABLE:
        raise AdapterError(f"peft_type {method} cannot be served: {UNSERVABLE[method]}")
    if method not in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING") + compat.KV_PREFIX_TYPES:
        raise AdapterError(f"peft_type {method} is not a prompt-learning adapter that can be served")
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{where} has no 'prompt_embeddings' tensor (keys: {sorted(tensors)})")
    table = tensors["prompt_embeddings"]
    if table.dim() != 2 or table.shape[0] == 0:
        raise AdapterError(f"prompt_embeddings in {where} must be [k >= 1, width], got {tuple(table.shape)}")
    if method != "MULTITASK_PROMPT_TUNING":
        return AdapterSource(method, {"": table}, config)
    missing = [key for key in ("prefix_task_cols", "prefix_task_rows") if key not in tensors]
    if missing:
        raise AdapterError(f"{where} is a multitask adapter without {missing}")
    cols, rows = tensors["prefix_task_cols"], tensors["prefix_task_rows"]  # [T, k, r], [T, r, hidden]
    if cols.dim() != 3 or rows.dim() != 3 or cols.shape[0] != rows.shape[0] or cols.shape[1] != table.shape[0] \
            or rows.shape[2] != table.shape[1] or cols.shape[2] != rows.shape[1]:
        raise AdapterError(f"multitask factors in {where} do not fit prompt_embeddings {tuple(table.shape)}: "
                           f"prefix_task_cols {tuple(cols.shape)}, prefix_task_rows {tuple(rows.shape)}")
    per_task = table.float()[None] * torch.matmul(cols.float(), rows.float())  # PEFT's MultitaskPromptEmbedding
    return AdapterSource(method, {str(t): per_task[t].to(table.dtype) for t in range(per_task.shape[0])}, config)


def check_fits(source: AdapterSource, shape: ModelShape) -> None:
    """Refuses an adapter made for another model, naming what differs."""
    width = next(iter(source.tables.values())).shape[1]
    if source.kind == "prompt":
        if width != shape.hidden_size:
            raise AdapterError(f"prompt embeddings must be [k, hidden_size={shape.hidden_size}] for this model, "
                               f"got width {width} (an adapter made for another model?)")
        return
    config = source.config
    checks = (("num_layers", getattr(config, "num_layers", None), shape.num_layers),
              ("num_attention_heads (kv heads)", getattr(config, "num_attention_heads", None), shape.num_kv_heads),
              ("head dim", (config.token_dim // config.num_attention_heads)
               if getattr(config, "token_dim", None) and getattr(config, "num_attention_heads", None) else None,
               shape.head_dim))
    for what, theirs, ours in checks:
        if theirs is not None and theirs != ours:
            raise AdapterError(f"the adapter was made for a model with {what} = {theirs}; this model has {ours}")
    expected = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim
    if width != expected:
        raise AdapterError(f"prefix embeddings must be [k, layers*2*Hkv*D={expected}] for this model "
                           f"({shape.num_layers} layers, {shape.num_kv_heads} kv heads, head dim {shape.head_dim}); "
                           f"got width {width}")


def prefix_kv(table: torch.Tensor, shape: ModelShape) -> AdapterKV:
    """PEFT's prefix table ``[k, layers * 2 * Hkv * D]`` as per-layer K/V (post-rotary, as PEFT's cache holds)."""
    k = table.shape[0]
    kv = table.view(k, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim).permute(1, 2, 3, 0, 4)
    return AdapterKV(kv[:, 0].contiguous(), kv[:, 1].contiguous(), "prefix")


def prompt_kv(prompt: torch.Tensor, run_prompt: PromptRunner) -> AdapterKV:
    """A prompt ``[k, hidden]`` run through the frozen model once: its per-layer K/V at positions 0..k-1."""
    with torch.no_grad():
        layers = run_prompt(prompt[None])
    return AdapterKV(torch.cat([k for k, _ in layers]), torch.cat([v for _, v in layers]), "prompt")


def hf_prompt_runner(model) -> PromptRunner:
    """Runs prompts through a Hugging Face causal LM that is on softprompt attention (PromptBank's model)."""
    from .hf.prompts import run_prompt_once

    weight = model.get_input_embeddings().weight

    def run(prompts: torch.Tensor):
        return run_prompt_once(model, prompts.to(weight.device, weight.dtype), want_logits=False).layers
    return run


def adapter_kv(source: AdapterSource, shape: ModelShape, run_prompt: Optional[PromptRunner],
               table: str = "") -> AdapterKV:
    """One served table of ``source`` as per-layer K/V (``run_prompt`` is needed for prompt kinds only)."""
    check_fits(source, shape)
    if source.kind == "prefix":
        return prefix_kv(source.tables[table], shape)
    if run_prompt is None:
        raise AdapterError("a prompt adapter needs the frozen model to run its prompt through")
    return prompt_kv(source.tables[table], run_prompt)
