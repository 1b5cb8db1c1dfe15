"""Serve soft prompts on vLLM: PEFT prompt, P-tuning, prefix, Cartridge and multitask adapters, mixed in one batch.

A vLLM general plugin (entry point ``vllm.general_plugins: softprompt``) and an endpoint plugin (routes
``/v1/softprompt/adapters``; ``vllm.endpoint_plugins: softprompt``). How it works: docs/DESIGN.md section 9.

    from vllm import LLM, SamplingParams
    from softprompt_kernels import vllm as skv

    llm = LLM(model="path/to/model")
    skv.add_adapters(llm, {"support": "adapters/support", "legal": "adapters/legal"})
    outputs = skv.generate(llm, ["Hello", "Hi"], adapters=["support", None], sampling_params=SamplingParams())

The server: ``softprompt-kernels serve --engine vllm --model DIR --adapter NAME=PATH ... [vLLM arguments]``;
``"model": NAME`` in a request selects the adapter.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

from ..adapters import AdapterError, ModelShape, check_fits, read_peft_directory
from .table import TABLE, Entry, check_name

ADAPTERS_ENV = "SOFTPROMPT_VLLM_ADAPTERS"  # JSON [[name, path], ...]: registered when the API server starts
PLUGIN_NAME = "softprompt"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: installs the hooks in this process (idempotent)."""
    from . import _hooks

    _hooks.install()


def plan_adapters(adapters: Mapping[str, str], model_config, served_model_names: Sequence[str] = ()
                  ) -> Tuple[List[dict], List[Entry]]:
    """Reads and checks adapters against the served model and reserves their virtual ids.

    Returns (specs for the workers' ``softprompt_add``, entries to publish once the workers hold them).
    A bad adapter raises AdapterError naming it and the reason; nothing is published then.
    """
    shape = ModelShape.of(model_config.hf_config)
    vocab_size = model_config.get_vocab_size()
    specs, entries, seen = [], [], set()
    for name, path in adapters.items():
        try:
            check_name(name, served_model_names)
            source = read_peft_directory(path)
            check_fits(source, shape)
        except (AdapterError, ValueError) as exc:
            raise AdapterError(f"adapter {name!r} ({path}): {exc}") from exc
        if source.num_virtual_tokens + 1 >= model_config.max_model_len:
            raise AdapterError(f"adapter {name!r} has {source.num_virtual_tokens} virtual tokens; the model's "
                               f"maximum length is {model_config.max_model_len}")
        for served, table in source.served_names(name).items():
            if served in seen or TABLE.get(served) is not None:
                raise AdapterError(f"an adapter named {served!r} is already registered")
            seen.add(served)
            first = TABLE.reserve(served, source.num_virtual_tokens, vocab_size, served_model_names)
            specs.append({"name": served, "path": str(path), "table": table, "first_id": first})
            entries.append(Entry(served, first, source.num_virtual_tokens, source.kind, str(path)))
    return specs, entries


def publish(entries: Sequence[Entry]) -> None:
    for entry in entries:
        TABLE.publish(entry)


def add_adapters(llm, adapters: Mapping[str, str]) -> List[str]:
    """Registers PEFT adapter directories ``{name: path}`` with a ``vllm.LLM``; returns the served names
    (a multitask adapter is served as ``name:task`` for each task)."""
    register()
    config = llm.llm_engine.model_config
    specs, entries = plan_adapters(adapters, config, _served_names(config))
    llm.collective_rpc("softprompt_add", args=(specs,))
    publish(entries)
    return [entry.name for entry in entries]


def remove_adapter(llm, name: str) -> None:
    TABLE.remove(name)
    llm.collective_rpc("softprompt_remove", args=(name,))


def adapter_names() -> List[str]:
    return TABLE.names()


def sampling_params_for(adapter: Optional[str], params=None):
    """A copy of ``params`` (vllm.SamplingParams) that selects ``adapter`` (None: the base model)."""
    from vllm import SamplingParams

    params = SamplingParams() if params is None else params.clone()
    if adapter is None:
        return params
    if TABLE.get(adapter) is None:
        raise KeyError(f"unknown adapter {adapter!r}; registered: {TABLE.names()}")
    params.extra_args = {**(params.extra_args or {}), **TABLE.extra_args(adapter)}
    return params


def generate(llm, prompts, adapters: Sequence[Optional[str]], sampling_params=None, **kwargs):
    """``llm.generate`` with one adapter (or None) per prompt, all in one batch."""
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"adapters must name one adapter (or None) per prompt: {len(prompts)} prompts, "
                         f"{len(adapters)} adapters")
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != len(prompts):
            raise ValueError("sampling_params must be one object or one per prompt")
        params = [sampling_params_for(a, p) for a, p in zip(adapters, sampling_params)]
    else:
        params = [sampling_params_for(a, sampling_params) for a in adapters]
    return llm.generate(prompts, params, **kwargs)


def _served_names(model_config) -> Tuple[str, ...]:
    names = getattr(model_config, "served_model_name", None) or model_config.model
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


__all__ = ["register", "add_adapters", "remove_adapter", "adapter_names", "sampling_params_for", "generate",
           "AdapterError", "ADAPTERS_ENV"]
