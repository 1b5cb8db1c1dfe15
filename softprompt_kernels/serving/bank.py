"""``PromptBank``: many prompt adapters for one frozen causal LM, served from one device bank.

Every adapter becomes per-layer K/V once, when it is added (docs/DESIGN.md section 3): prompt tuning and
P-tuning adapters are run through the model (batch 1) and their cached K/V kept; prefix-tuning adapters
are their K/V already. All resident adapters live in one tensor per layer, ``[capacity, Hkv, K, D]``,
indexed by slot; a batch names each row's adapter and the attention reads its slot through
``prompt_ids`` (``prefix_lens`` per slot, so adapters of different lengths coexist). When more adapters
are added than fit, the least recently used go to host memory and come back on demand.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..hf import _compat
from ..hf.attention import SoftPromptContext, use_softprompt_attention
from ..hf.families import family_of
from ..hf.prompts import prompt_encoder_output, run_prompt_once


class AdapterError(ValueError):
    """An adapter cannot be added: made for another model, unreadable, or a duplicate name."""


@dataclass
class _Prefix:
    keys: torch.Tensor    # [layers, Hkv, k, D]
    values: torch.Tensor  # [layers, Hkv, k, D]
    kind: str             # "prompt" | "prefix": how it was made (for information)

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class PromptBank:
    """Prompt adapters of one frozen causal LM, resident on its device up to ``capacity``."""

    def __init__(self, model, capacity: int = 64, max_prompt_len: int = 0):
        family = family_of(model.config)
        if not family.causal:
            raise AdapterError(f"PromptBank serves causal language models; {family.model_type} is an encoder")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.model = model.eval()
        self.family = family
        use_softprompt_attention(model)
        config = _compat.text_config(model)
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.capacity = capacity
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._width = max_prompt_len
        self._keys = self._values = None  # [layers, capacity, Hkv, width, D], allocated on first add
        self._lengths = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._resident: "OrderedDict[str, int]" = OrderedDict()  # name -> slot, least recently used first
        self._host: Dict[str, _Prefix] = {}  # every adapter, on the host (the resident ones are also on device)

    # --- adding and removing

    def add(self, name: str, source, kind: Optional[str] = None) -> None:
        """Adds an adapter from a PEFT directory, a PEFT model, or a tensor (``kind`` "prompt" or "prefix")."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._host:
            raise AdapterError(f"an adapter named {name!r} is already in the bank")
        prefix = self._prefix_from(source, kind)
        self._host[name] = _Prefix(prefix.keys.cpu(), prefix.values.cpu(), prefix.kind)
        self._make_resident(name, prefix, protected=())

    def remove(self, name: str) -> None:
        if name not in self._host:
            raise KeyError(f"no adapter named {name!r}; the bank holds {self.names()}")
        del self._host[name]
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._lengths[slot] = 0

    def names(self) -> List[str]:
        return sorted(self._host)

    def prompt_length(self, name: str) -> int:
        """The adapter's number of virtual tokens (the positions its prompt takes)."""
        return self._host[name].length

    def resident(self) -> List[str]:
        """Adapters on the device, least recently used first."""
        return list(self._resident)

    def __contains__(self, name) -> bool:
        return name in self._host

    def __len__(self) -> int:
        return len(self._host)

    # --- what a batch reads

    def context_for(self, adapters: Sequence[Optional[str]]) -> Tuple[SoftPromptContext, torch.Tensor]:
        """(attention context, prompt length per row) for rows naming adapters (None: no prompt)."""
        wanted = [name for name in dict.fromkeys(adapters) if name is not None]
        unknown = [name for name in wanted if name not in self._host]
        if unknown:
            raise KeyError(f"unknown adapters {unknown}; the bank holds {self.names()}")
        if len(wanted) > self.capacity:
            raise AdapterError(f"a batch names {len(wanted)} adapters but the bank holds {self.capacity} at once")
        for name in wanted:
            if name in self._resident:
                self._resident.move_to_end(name)
            else:
                self._make_resident(name, self._host[name], protected=wanted)
        slots = [self._resident[name] if name is not None else -1 for name in adapters]
        prompt_ids = torch.tensor(slots, dtype=torch.long, device=self.device)
        row_lengths = torch.where(prompt_ids >= 0, self._lengths[prompt_ids.clamp(min=0)], 0)
        if self._keys is None:  # nothing added yet: an empty bank
            empty = torch.zeros((0, self.num_kv_heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
            layers = [(empty, empty)] * self.num_layers
            lengths = None
        else:
            layers = [(self._keys[i], self._values[i]) for i in range(self.num_layers)]
            lengths = self._lengths
        context = SoftPromptContext(layer_prefixes=layers, prompt_ids=prompt_ids, prefix_lens=lengths)
        return context, row_lengths

    # --- internals

    def _make_resident(self, name: str, prefix: _Prefix, protected: Sequence[str]) -> None:
        self._ensure_width(prefix.length)
        if len(self._resident) < self.capacity:
            used = set(self._resident.values())
            slot = next(s for s in range(self.capacity) if s not in used)
        else:  # evict the least recently used adapter that this batch does not need
            victim = next((n for n in self._resident if n not in protected), None)
            if victim is None:
                raise AdapterError("every resident adapter is in use by this batch; raise capacity")
            slot = self._resident.pop(victim)
        k = prefix.length
        self._keys[:, slot, :, :k] = prefix.keys.to(self.device, self.dtype)
        self._values[:, slot, :, :k] = prefix.values.to(self.device, self.dtype)
        self._lengths[slot] = k
        self._resident[name] = slot

    def _ensure_width(self, length: int) -> None:
        if self._keys is not None and length <= self._width:
            return
        width = max(length, self._width)
        shape = (self.num_layers, self.capacity, self.num_kv_heads, width, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        if self._keys is not None:  # grow: keep what is resident
            keys[..., : self._width, :] = self._keys
            values[..., : self._width, :] = self._values
        self._keys, self._values, self._width = keys, values, width

    def _prefix_from(self, source, kind: Optional[str]) -> _Prefix:
        if isinstance(source, (str, os.PathLike)):
            embeddings, config = _read_peft_directory(os.fspath(source))
            return self._from_peft_output(embeddings, config)
        if _compat.is_peft_prompt_model(source):
            with torch.no_grad():
                embeddings = prompt_encoder_output(source).detach()
            return self._from_peft_output(embeddings, _compat.active_config(source))
        if isinstance(source, torch.Tensor):
            if kind not in ("prompt", "prefix"):
                raise AdapterError(f"a tensor source needs kind='prompt' ([k, hidden]) or 'prefix' "
                                   f"([k, layers * 2 * Hkv * D]); got kind={kind!r}")
            return self._from_prompt(source) if kind == "prompt" else self._from_prefix(source)
        raise AdapterError(f"source must be a PEFT adapter directory, a PEFT model or a tensor; "
                           f"got {type(source).__name__}")

    def _from_peft_output(self, embeddings: torch.Tensor, config) -> _Prefix:
        method = _compat.peft_type_name(config)
        if method in ("PROMPT_TUNING", "P_TUNING"):
            return self._from_prompt(embeddings)
        if _compat.is_kv_prefix(config):
            self._check_prefix_config(config)
            return self._from_prefix(embeddings)
        raise AdapterError(f"peft_type {method} is not a prompt-learning adapter PromptBank can serve")

    def _from_prompt(self, embeddings: torch.Tensor) -> _Prefix:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.hidden_size:
            raise AdapterError(f"prompt embeddings must be [k, hidden_size={self.hidden_size}] for this model, "
                               f"got {tuple(embeddings.shape)} (an adapter made for another model?)")
        prompts = embeddings.to(self.device, self.model.get_input_embeddings().weight.dtype)[None]
        with torch.no_grad():
            layers = run_prompt_once(self.model, prompts, want_logits=False).layers
        keys = torch.cat([k for k, _ in layers])  # [layers, Hkv, k, D]
        values = torch.cat([v for _, v in layers])
        return _Prefix(keys, values, "prompt")

    def _from_prefix(self, embeddings: torch.Tensor) -> _Prefix:
        width = self.num_layers * 2 * self.num_kv_heads * self.head_dim
        if embeddings.dim() != 2 or embeddings.shape[1] != width:
            raise AdapterError(f"prefix embeddings must be [k, layers*2*Hkv*D={width}] for this model "
                               f"({self.num_layers} layers, {self.num_kv_heads} kv heads, head dim {self.head_dim}); "
                               f"got {tuple(embeddings.shape)}")
        k = embeddings.shape[0]
        kv = embeddings.view(k, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return _Prefix(kv[:, 0].contiguous(), kv[:, 1].contiguous(), "prefix")

    def _check_prefix_config(self, config) -> None:
        checks = (("num_layers", getattr(config, "num_layers", None), self.num_layers),
                  ("num_attention_heads (kv heads)", getattr(config, "num_attention_heads", None), self.num_kv_heads),
                  ("head dim", (config.token_dim // config.num_attention_heads)
                   if getattr(config, "token_dim", None) and getattr(config, "num_attention_heads", None) else None,
                   self.head_dim))
        for what, theirs, ours in checks:
            if theirs is not None and theirs != ours:
                raise AdapterError(f"the adapter was made for a model with {what} = {theirs}; this model has {ours}")


def _read_peft_directory(directory: str):
    """(prompt_embeddings, PeftConfig) of a PEFT adapter directory, with safetensors only."""
    from peft import PeftConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = os.path.join(directory, "adapter_config.json")
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"missing {os.path.basename(path)} in {directory!r} (PromptBank reads safetensors only)")
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
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{weights_path} has no 'prompt_embeddings' tensor (keys: {sorted(tensors)})")
    return tensors["prompt_embeddings"], config
