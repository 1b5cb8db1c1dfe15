"""Backends of ``prefix_attention`` and how ``backend="auto"`` chooses among them.

Each backend says whether this install can run it (``unavailable_reason``) and why it
refuses given inputs (``not_supported_reasons``, as xformers does). ``auto`` walks the
preference list for the inputs' device and takes the first backend that accepts them;
when it ends on the pure-PyTorch path although a fused backend exists for that device,
it warns once with the reasons, so a slow path is never taken silently.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch

from . import _ops
from ._validation import BackendNotSupportedError, InvalidArgumentError, PrefixAttentionInputs
from .reference import prefix_attention_torch


class PerformanceWarning(UserWarning):
    """A fused backend could not be used and a slower one was taken."""


class Backend:
    name: str = ""
    description: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when this install can run the backend, else why not."""
        return None

    def not_supported_reasons(self, inputs: PrefixAttentionInputs) -> List[str]:
        reason = self.unavailable_reason()
        return [reason] if reason else []

    def auto_declines(self, inputs: PrefixAttentionInputs) -> Optional[str]:
        """Why ``auto`` should pass over this backend for inputs it can run (another is preferred)."""
        return None

    def run(self, inputs: PrefixAttentionInputs, return_lse: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"
    description = "pure PyTorch: expand + concatenate + SDPA, what PEFT does (baseline and oracle)"

    def run(self, inputs, return_lse):
        return prefix_attention_torch(inputs, return_lse)


class CppCpuBackend(Backend):
    name = "cpu"
    description = "fused C++ kernel: no copies, online softmax, at::parallel_for (forward and backward)"

    def unavailable_reason(self):
        return _ops.EXTENSION_ERROR

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type != "cpu":
            reasons.append(f"the cpu backend needs CPU tensors, got {inputs.device}")
        return reasons

    def run(self, inputs, return_lse):
        return run_extension_op(inputs, return_lse)


def run_extension_op(inputs: PrefixAttentionInputs, return_lse: bool):
    """The C++ extension's op (its CPU or CUDA kernel, chosen by the dispatcher from the device)."""
    out, lse = torch.ops.softprompt_kernels.prefix_attention_fwd(
        inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prompt_ids,
        inputs.prefix_lens, inputs.key_padding_mask, inputs.causal, inputs.scale)
    return out, (lse if return_lse else None)


_BACKENDS: Dict[str, Backend] = {}
# Preference order per device type for backend="auto" (fastest first).
_AUTO_ORDER: Dict[str, List[str]] = {"cpu": ["cpu", "torch"], "cuda": ["torch"]}


def register_backend(backend: Backend, auto_order: Optional[Dict[str, int]] = None) -> None:
    """Adds a backend; ``auto_order`` maps device type -> position in that device's preference list."""
    _BACKENDS[backend.name] = backend
    for device_type, position in (auto_order or {}).items():
        order = _AUTO_ORDER.setdefault(device_type, ["torch"])
        if backend.name not in order:
            order.insert(position, backend.name)


register_backend(TorchBackend())
register_backend(CppCpuBackend())


def backend_names() -> List[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        raise InvalidArgumentError(f"backend must be 'auto' or one of {backend_names()}, got {name!r}")
    return _BACKENDS[name]


def available_backends() -> List[str]:
    """Names of the backends this install can run (on some device present here)."""
    names = []
    for name, backend in _BACKENDS.items():
        if backend.unavailable_reason() is None:
            names.append(name)
    return names


def backend_status() -> Dict[str, Optional[str]]:
    """Every backend with None (usable here) or the reason this install cannot run it."""
    return {name: backend.unavailable_reason() for name, backend in _BACKENDS.items()}


_warned: set = set()


def select_backend(inputs: PrefixAttentionInputs, requested: str = "auto") -> Backend:
    """The backend that will run ``inputs``; raises BackendNotSupportedError with reasons."""
    if requested != "auto":
        backend = get_backend(requested)
        reasons = backend.not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(
                f"backend={requested!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    refused = {}
    for name in _AUTO_ORDER.get(inputs.device.type, ["torch"]):
        reasons = _BACKENDS[name].not_supported_reasons(inputs)
        if not reasons and _BACKENDS[name].auto_declines(inputs):
            continue  # runnable, but another backend is preferred for these shapes: not a fallback
        if not reasons:
            if name == "torch" and refused:
                _warn_fallback(inputs.device.type, refused)
            return _BACKENDS[name]
        refused[name] = reasons
    raise BackendNotSupportedError(f"no backend can run these inputs: {refused}")


def _warn_fallback(device_type: str, refused: Dict[str, List[str]]) -> None:
    key = (device_type, tuple((name, tuple(reasons)) for name, reasons in refused.items()))
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in refused.items())
    warnings.warn(f"prefix_attention on {device_type} falls back to the pure-PyTorch path ({detail})",
                  PerformanceWarning, stacklevel=4)
