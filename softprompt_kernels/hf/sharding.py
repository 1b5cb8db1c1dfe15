"""Prompt training on a sharded frozen model: FSDP2 (``fully_shard``), FSDP (Accelerate, ``Trainer``), ZeRO-3.

What the integration needs to know about those engines, in one place (docs/DESIGN.md section 8):

- :func:`is_sharded`: whether the base model's weights are sharded (then each layer's weights are gathered
  on every call, and the prompt of prompt/P-tuning goes through the model packed with the text as row 0 of
  one batch instead of in a separate batch-1 pass that would gather every layer a second time);
- :func:`full_prompt_parameters`: the prompt encoder's full parameters on every rank for a block (each rank
  runs the encoder; run on rank 0 alone, as ``save_pretrained`` does, it hangs or reads a shard);
- :func:`save_adapter`: PEFT's adapter files written once (the main process), computed on every rank.

The engines are imported only when a model uses them, so none of them is a dependency.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

from . import compat


def _fsdp2_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def _fsdp1_module_type():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def _is_zero3_parameter(parameter: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 marks the parameters it partitions with ``ds_id`` (and gathers them per module call)."""
    return hasattr(parameter, "ds_id")


def is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2, FSDP or ZeRO-3 shards some of ``model``'s weights (checked on every forward: the
    engines wrap a model after ``accelerate()``, and a cheap walk beats a stale flag)."""
    types = tuple(t for t in (_fsdp2_module_type(), _fsdp1_module_type()) if t is not None)
    for module in model.modules():
        if types and isinstance(module, types):
            return True
    first = next(model.parameters(), None)
    return first is not None and _is_zero3_parameter(first)


def _fsdp_roots(peft_model) -> List[torch.nn.Module]:
    """The outermost FSDP2 modules that own the prompt encoder's parameters (the PeftModel, usually)."""
    fsdp2 = _fsdp2_module_type()
    if fsdp2 is None:
        return []
    encoder_params = {id(p) for p in compat.prompt_encoder(peft_model).parameters()}
    roots = []
    for module in peft_model.modules():
        if isinstance(module, fsdp2) and any(id(p) in encoder_params for p in module.parameters(recurse=False)):
            roots.append(module)
        elif isinstance(module, fsdp2) and module is peft_model:
            roots.append(module)
    return roots


@contextlib.contextmanager
def full_prompt_parameters(peft_model) -> Iterator[None]:
    """Within the block, the prompt encoder's parameters are whole on every rank (a collective: every rank
    must enter it). FSDP2: the owning module is unsharded; FSDP (a wrapper somewhere above or around the
    model): ``summon_full_params``; ZeRO-3: ``GatheredParameters``. Unsharded models: nothing to do."""
    encoder = compat.prompt_encoder(peft_model)
    params = list(encoder.parameters())
    with contextlib.ExitStack() as stack:
        if any(_is_zero3_parameter(p) for p in params):
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
        else:
            roots = _fsdp_roots(peft_model)
            for root in roots:
                root.unshard()
                stack.callback(root.reshard)
            fsdp1 = _fsdp1_module_type()
            wrappers = [m for m in peft_model.modules() if fsdp1 is not None and isinstance(m, fsdp1)]
            if wrappers:
                stack.enter_context(fsdp1.summon_full_params(wrappers[0], writeback=False, recurse=True))
        yield


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_adapter(peft_model, directory: str) -> None:
    """PEFT's ``save_pretrained`` under sharding: every rank computes the adapter, the main process writes it.

    Collective: call it on every rank. ``save_pretrained`` runs the prompt encoder to get what it saves
    (``get_prompt_embedding_to_save``); here it runs on every rank, inside :func:`full_prompt_parameters`, so
    no rank waits for the others and none saves a shard. The files are PEFT's own (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable by plain ``PeftModel.from_pretrained`` on one process.
    """
    with full_prompt_parameters(peft_model), torch.no_grad():
        compat.save_prompt_adapter(peft_model, directory, _is_main_process())
