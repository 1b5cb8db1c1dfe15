"""``PromptBank``: many prompt adapters for one frozen causal LM, served from one device bank.

Every adapter becomes per-layer K/V once, when it is added (docs/DESIGN.md section 3; softprompt_kernels/adapters.py,
the registration code the vLLM plugin shares): prompt tuning and P-tuning adapters are run through the model
(batch 1) and their cached K/V kept; prefix-tuning adapters and Cartridges are their K/V already; a multitask
adapter is served as ``name:task``, one prompt per task. All resident adapters live in one tensor per layer,
``[capacity, Hkv, K, D]``, indexed by slot; a batch names each row's adapter and the attention reads its slot through
``prompt_ids`` (``prefix_lens`` per slot, so adapters of different lengths coexist). When more adapters
are added than fit, the least recently used go to host memory and come back on demand. ``generate`` runs a
batch to its end with the model steps of step.py (those the engine runs).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..hf import compat
from ..hf.attention import SoftPromptContext, use_softprompt_attention
from ..hf.families import family_of
from ..hf.prefix_bank import bank_context
from ..adapters import (AdapterError, AdapterKV, ModelShape, adapter_kv, hf_prompt_runner,
                       read_peft_directory, source_of_peft_model, source_of_tensor)
from .step import decode, extend_mask, prefill, sample


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
        self.shape = ModelShape.of(model)
        self.num_layers, self.hidden_size = self.shape.num_layers, self.shape.hidden_size
        self.num_kv_heads, self.head_dim = self.shape.num_kv_heads, self.shape.head_dim
        self._run_prompt = hf_prompt_runner(model)
        self.capacity = capacity
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._width = max_prompt_len
        self._keys = self._values = None  # [layers, capacity, Hkv, width, D], allocated on first add
        self._lengths = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._resident: "OrderedDict[str, int]" = OrderedDict()  # name -> slot, least recently used first
        self._host: Dict[str, AdapterKV] = {}  # every adapter, on the host (the resident ones are also on device)

    # --- adding and removing

    def add(self, name: str, source, kind: Optional[str] = None) -> List[str]:
        """Adds an adapter from a PEFT directory, a PEFT model, or a tensor (``kind`` "prompt" or "prefix").

        Returns the names it is served under: ``name``, or ``name:task`` for each task of a multitask adapter.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter name must be a non-empty string, got {name!r}")
        prefixes = self._prefixes_from(name, source, kind)
        taken = [served for served in prefixes if served in self._host]
        if taken:
            raise AdapterError(f"an adapter named {taken[0]!r} is already in the bank")
        for served, prefix in prefixes.items():
            self._host[served] = AdapterKV(prefix.keys.cpu(), prefix.values.cpu(), prefix.kind)
            self._make_resident(served, prefix, protected=())
        return list(prefixes)

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
        """(attention context, prompt length per row) for rows naming adapters (None: no prompt).

        The context puts each row's prefix right after its own left padding (``prefix_after_padding``): serving
        numbers a row's positions by its real tokens, so with a sliding window a request sees the keys it would
        see alone, whatever it is batched with.
        """
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
        layers = lengths = None  # nothing added yet: an empty bank
        if self._keys is not None:
            layers = [(self._keys[i], self._values[i]) for i in range(self.num_layers)]
            lengths = self._lengths
        return bank_context(self.model, layers, lengths, slots, self.device, prefix_after_padding=True)

    # --- generating

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 adapters: Optional[Sequence[Optional[str]]] = None, max_new_tokens: Union[int, Sequence[int]] = 32,
                 do_sample: bool = False, temperature: Union[float, Sequence[float]] = 1.0,
                 top_p: Union[float, Sequence[float]] = 1.0, seed: Union[None, int, Sequence[Optional[int]]] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: int = 0,
                 on_token: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> List[List[int]]:
        """New tokens of every row of ``input_ids [B, n]`` (left-padded), each row with its adapter (None: the
        bare model); a row stops after its EOS or its ``max_new_tokens``.

        ``on_token(tokens [B], active [B] bool)``, if given, is called as each step's tokens are chosen
        (streaming, per-token latency measurements).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, n], got shape {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        device = self.device
        input_ids = input_ids.to(device)
        adapters = list(adapters) if adapters is not None else [None] * batch
        if len(adapters) != batch:
            raise ValueError(f"adapters has {len(adapters)} entries for a batch of {batch} rows")
        mask = (attention_mask.to(device).long() if attention_mask is not None
                else torch.ones_like(input_ids))
        limits = _per_row(max_new_tokens, batch, "max_new_tokens", device).long()
        temperatures = (_per_row(temperature, batch, "temperature", device) if do_sample
                        else torch.zeros(batch, device=device))
        top_ps = _per_row(top_p, batch, "top_p", device)
        seeds = seed if isinstance(seed, (list, tuple)) else [seed] * batch
        generators = [torch.Generator().manual_seed(int(s) + (row if not isinstance(seed, (list, tuple)) else 0))
                      if s is not None else None for row, s in enumerate(seeds)]

        prefilled = prefill(self, input_ids, mask, adapters)
        logits = prefilled.logits
        new = [[] for _ in range(batch)]
        finished = limits <= 0
        for step in range(int(limits.max()) if batch else 0):
            token = sample(logits, temperatures, top_ps, generators)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            chosen = token.tolist()  # one transfer per step, not one per row
            for row in (~finished).nonzero().flatten().tolist():
                new[row].append(chosen[row])
            if on_token is not None:
                on_token(token, ~finished)
            finished = finished | (limits <= step + 1)
            if eos_token_id is not None:
                finished = finished | (token == eos_token_id)
            if bool(finished.all()):
                break
            mask = extend_mask(mask)
            logits = decode(self, token, mask, prefilled.cache, prefilled.context, prefilled.row_lengths)
        return new

    # --- internals

    def _make_resident(self, name: str, prefix: AdapterKV, protected: Sequence[str]) -> None:
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

    def _prefixes_from(self, name: str, source, kind: Optional[str]) -> Dict[str, AdapterKV]:
        if isinstance(source, torch.Tensor):
            if kind not in ("prompt", "prefix"):
                raise AdapterError(f"a tensor source needs kind='prompt' ([k, hidden]) or 'prefix' "
                                   f"([k, layers * 2 * Hkv * D]); got kind={kind!r}")
            adapter = source_of_tensor(source.detach(), kind)
        elif isinstance(source, (str, os.PathLike)):
            adapter = read_peft_directory(os.fspath(source))
        elif compat.active_config(source) is not None:  # a PEFT model (other methods are refused by name)
            adapter = source_of_peft_model(source)
        else:
            raise AdapterError(f"source must be a PEFT adapter directory, a PEFT model or a tensor; "
                               f"got {type(source).__name__}")
        return {served: adapter_kv(adapter, self.shape, self._run_prompt, table)
                for served, table in adapter.served_names(name).items()}


generate = PromptBank.generate  # the function form, serving.generate(bank, input_ids, ...)


def _per_row(value, batch: int, name: str, device) -> torch.Tensor:
    values = value if isinstance(value, (list, tuple)) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {batch} rows")
    return torch.tensor([float(v) for v in values], device=device)
