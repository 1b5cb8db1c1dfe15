"""Which virtual token ids stand for which adapter (the API-server side; no vLLM import).

An adapter of k virtual tokens owns the ids ``[first, first + k)`` past the model's vocabulary. A request for
it carries ``[first, first + k)`` in its sampling parameters' ``extra_args``; the engine core puts those ids in
front of the text (text positions from k, PEFT's numbering), and every worker replaces their keys and values
with the adapter's before they reach the KV cache. Ids are never reused: a re-registered name gets new ids,
so vLLM's prefix cache (blocks hashed by token ids) can never serve an old adapter's blocks for a new one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

ADAPTER_KEY = "softprompt_adapter"      # extra_args: the adapter's served name (for logs and errors)
IDS_KEY = "softprompt_virtual_ids"      # extra_args: [first id, k]
RESERVED_NAMES = ("base",)


@dataclass(frozen=True)
class Entry:
    name: str
    first_id: int
    length: int
    kind: str   # "prompt" | "prefix"
    path: str


class VirtualTokenTable:
    """Served adapter names -> their virtual ids (one per API-server process)."""

    def __init__(self):
        self._entries: Dict[str, Entry] = {}
        self._next: Optional[int] = None
        self._lock = threading.Lock()

    def reserve(self, name: str, length: int, vocab_size: int, served_model_names=()) -> int:
        """The first id of ``length`` fresh ids for ``name`` (not yet visible to requests: see ``publish``)."""
        check_name(name, served_model_names)
        if name in self._entries:
            raise ValueError(f"an adapter named {name!r} is already registered")
        if length < 1:
            raise ValueError(f"adapter {name!r} has {length} virtual tokens; expected >= 1")
        with self._lock:
            first = max(self._next or vocab_size, vocab_size)
            self._next = first + length
        return first

    def publish(self, entry: Entry) -> None:
        with self._lock:
            if entry.name in self._entries:
                raise ValueError(f"an adapter named {entry.name!r} is already registered")
            self._entries[entry.name] = entry

    def remove(self, name: str) -> Entry:
        with self._lock:
            if name not in self._entries:
                raise KeyError(name)
            return self._entries.pop(name)

    def get(self, name: Optional[str]) -> Optional[Entry]:
        return self._entries.get(name) if isinstance(name, str) else None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def entries(self) -> List[Entry]:
        return [self._entries[n] for n in self.names()]

    def extra_args(self, name: str) -> Dict[str, object]:
        entry = self._entries[name]
        return {ADAPTER_KEY: name, IDS_KEY: [entry.first_id, entry.length]}


def check_name(name, served_model_names=()) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"an adapter name must be a non-empty string without spaces, got {name!r}")
    if name in RESERVED_NAMES or name in served_model_names:
        raise ValueError(f"adapter name {name!r} is reserved (the base model is served under it)")


def virtual_ids(extra_args) -> Optional[List[int]]:
    """The ids an engine request must carry in front of its text, or None (no adapter)."""
    if not extra_args or IDS_KEY not in extra_args:
        return None
    first, length = extra_args[IDS_KEY]
    return list(range(int(first), int(first) + int(length)))


TABLE = VirtualTokenTable()
