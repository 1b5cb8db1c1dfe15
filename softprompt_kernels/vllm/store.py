"""The worker side: every adapter's per-layer K/V, and which tokens of a step are virtual (no vLLM import).

Each worker holds, per attention layer, one row per virtual id: ``keys[layer][id - vocab_size]``
``[Hkv_local, D]``. Under tensor parallelism a worker keeps only its KV heads (``shard_kv_heads``, vLLM's
rule for QKVParallelLinear); under pipeline parallelism only its layers. A step's virtual tokens are found
on the host from the scheduled token ids (``find_virtual_tokens``): ids at or past the vocabulary, inside their
request's prompt. Their keys and values are replaced in every layer before vLLM writes the KV cache.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch


def shard_kv_heads(kv: torch.Tensor, tp_size: int, tp_rank: int, head_dim: int = 1) -> torch.Tensor:
    """The KV heads tensor-parallel rank ``tp_rank`` of ``tp_size`` holds, from ``kv`` with all heads on
    dimension ``head_dim``: a contiguous slice of ``Hkv / tp_size`` heads when ``tp_size <= Hkv`` (which
    must divide), else the one head that rank replicates (rank r holds head ``r // (tp_size / Hkv)``)."""
    heads = kv.shape[head_dim]
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
    if tp_size <= heads:
        if heads % tp_size:
            raise ValueError(f"{heads} kv heads do not split over tensor parallel size {tp_size}")
        per_rank = heads // tp_size
        return kv.narrow(head_dim, tp_rank * per_rank, per_rank).contiguous()
    if tp_size % heads:
        raise ValueError(f"tensor parallel size {tp_size} is not a multiple of the {heads} kv heads")
    return kv.narrow(head_dim, tp_rank // (tp_size // heads), 1).contiguous()


def find_virtual_tokens(token_ids: np.ndarray, num_scheduled: np.ndarray, num_computed: np.ndarray,
                        num_prompt: np.ndarray, vocab_size: int) -> Optional[np.ndarray]:
    """Flat indices of a step's virtual tokens, or None.

    token_ids [T] the step's scheduled ids, request after request; num_scheduled / num_computed / num_prompt
    [R] per request. A virtual token is an id >= vocab_size inside its request's prompt (positions the
    sampler may have written, under async scheduling, are outside the prompt).
    """
    candidates = np.flatnonzero(token_ids >= vocab_size)
    if candidates.size == 0:
        return None
    request = np.repeat(np.arange(len(num_scheduled)), num_scheduled)[candidates]
    starts = np.concatenate([[0], np.cumsum(num_scheduled)[:-1]])
    position = num_computed[request] + (candidates - starts[request])
    found = candidates[position < num_prompt[request]]
    return found if found.size else None


class AdapterStore:
    """Per-layer K/V rows for every virtual id a worker has been given."""

    def __init__(self, vocab_size: int, device, dtype):
        self.vocab_size = vocab_size
        self.device, self.dtype = device, dtype
        self.keys: Dict[int, torch.Tensor] = {}    # layer -> [rows, Hkv_local, D]
        self.values: Dict[int, torch.Tensor] = {}
        self.rows = 0
        self.names: Dict[str, Tuple[int, int]] = {}  # name -> (first id, k), for information

    def add(self, name: str, first_id: int, keys: torch.Tensor, values: torch.Tensor,
            layers: Iterable[int]) -> None:
        """keys/values ``[layers_total, Hkv_local, k, D]`` of one adapter; only ``layers`` are kept."""
        k = keys.shape[2]
        start = first_id - self.vocab_size
        if start < 0:
            raise ValueError(f"virtual ids start at the vocabulary size {self.vocab_size}, got {first_id}")
        end = start + k
        for layer in layers:
            for table, source in ((self.keys, keys), (self.values, values)):
                rows = source[layer].permute(1, 0, 2).to(self.device, self.dtype)  # [k, Hkv, D]
                current = table.get(layer)
                if current is None or current.shape[0] < end:
                    grown = torch.zeros((max(end, 2 * (0 if current is None else current.shape[0])),)
                                        + tuple(rows.shape[1:]), device=self.device, dtype=self.dtype)
                    if current is not None:
                        grown[: current.shape[0]] = current
                    table[layer] = current = grown
                current[start:end] = rows
        self.rows = max(self.rows, end)
        self.names[name] = (first_id, k)

    def remove(self, name: str) -> None:
        self.names.pop(name, None)  # its ids are never reused; the rows stay until the worker restarts

    def replace(self, layer: int, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor) -> None:
        """key/value ``[T, Hkv_local, D]`` (views into the layer's projections): the virtual tokens at flat
        ``positions`` take their rows, in place, so that vLLM's cache write and attention both see them."""
        if layer not in self.keys:
            return
        key[positions] = self.keys[layer][rows].to(key.dtype)
        value[positions] = self.values[layer][rows].to(value.dtype)
