"""The one backend registry of every op, and how ``backend="auto"`` chooses.

An op (``prefix_attention``, ``insert_prompt``) has backends; each says whether this install can
run it (``unavailable_reason``) and why it refuses given inputs (``not_supported_reasons``, as
xformers does). ``auto`` walks :data:`PRIORITY` for the op and the inputs' device type and takes
the first backend that accepts the inputs. When it ends on the pure-PyTorch path although a
faster backend is listed before it, it warns once (:class:`PerformanceWarning`) with every
skipped backend's reasons, so a slow path is never taken silently.

Backends register themselves from their own modules (``register_backend``); the order
``auto`` tries them in is the table below, not the order modules happen to be imported in.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..common import warn_once
from ..errors import BackendNotSupportedError, InvalidArgumentError

OPS = ("prefix_attention", "insert_prompt")

# backend="auto": the order backends are tried in, per op and device type (fastest first).
# cuda decode shapes (Lq <= 16) go to the CUDA kernels; prefill and training to Triton (the cuda
# backend declines prefill under auto and refuses inputs that need gradients). Triton under its
# CPU interpreter (TRITON_INTERPRET=1) is a correctness tool and never chosen for CPU tensors.
PRIORITY: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "prefix_attention": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    "insert_prompt": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
}
FALLBACK = "torch"  # every op's reference backend: runs anywhere, never refuses valid inputs


class PerformanceWarning(UserWarning):
    """A fused backend could not be used and a slower one was taken."""


class Backend:
    """One way to run one op. Subclasses set ``op``, ``name``, ``description`` and ``run``."""

    op: str = ""
    name: str = ""
    description: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when this install can run the backend, else why not."""
        return None

    def not_supported_reasons(self, inputs) -> List[str]:
        """Why this backend cannot run ``inputs`` (validated arguments of its op); empty when it can."""
        reason = self.unavailable_reason()
        return [reason] if reason else []

    def auto_declines(self, inputs) -> Optional[str]:
        """Why ``auto`` should pass over this backend for inputs it can run (another is preferred)."""
        return None

    def run(self, inputs, *args) -> Any:
        raise NotImplementedError


def needs_device(backend: Backend, inputs, device_type: str) -> List[str]:
    """The reason list of a backend that runs only on ``device_type`` tensors."""
    if inputs.device.type != device_type:
        return [f"the {backend.name} backend needs {device_type} tensors, got {inputs.device}"]
    return []


def needs_no_dropout(backend: Backend, inputs) -> List[str]:
    """The reason list of a fused backend: attention dropout is served by the reference backend only."""
    if getattr(inputs, "dropout_p", 0.0) > 0.0:
        return [f"the {backend.name} backend has no attention dropout (dropout_p={inputs.dropout_p}; "
                "the torch backend has)"]
    return []


def needs_no_varlen(backend: Backend, inputs) -> List[str]:
    """The reason list of a fused backend without variable-length rows (cu_seqlens): the reference serves them."""
    if getattr(inputs, "cu_seqlens", None) is not None:
        return [f"the {backend.name} backend has no variable-length rows (cu_seqlens) yet; the torch backend has"]
    return []


_BACKENDS: Dict[str, Dict[str, Backend]] = {op: {} for op in OPS}


def register_backend(backend: Backend) -> None:
    if backend.op not in _BACKENDS:
        raise ValueError(f"unknown op {backend.op!r}; ops are {list(OPS)}")
    _BACKENDS[backend.op][backend.name] = backend


def backend_names(op: str = "prefix_attention") -> List[str]:
    """The backends of ``op``: the reference first, the others by name (whatever the import order)."""
    return sorted(_registry(op), key=lambda name: (name != FALLBACK, name))


def _registry(op: str) -> Dict[str, Backend]:
    if op not in _BACKENDS:
        raise InvalidArgumentError(f"op must be one of {list(OPS)}, got {op!r}")
    return _BACKENDS[op]


def get_backend(name: str, op: str = "prefix_attention") -> Backend:
    """The backend ``name`` of ``op``; an unknown name raises InvalidArgumentError listing the known ones."""
    registry = _registry(op)
    if not isinstance(name, str) or name not in registry:
        raise InvalidArgumentError(f"backend must be 'auto' or one of {backend_names(op)}, got {name!r}")
    return registry[name]


def check_backend_name(name, op: str = "prefix_attention") -> None:
    """Rejects an unknown backend name before anything else is checked."""
    if name != "auto":
        get_backend(name, op)


def available_backends(op: str = "prefix_attention") -> List[str]:
    """Names of the backends of ``op`` this install can run (on some device present here)."""
    registry = _registry(op)
    return [name for name in backend_names(op) if registry[name].unavailable_reason() is None]


def backend_status(op: str = "prefix_attention") -> Dict[str, Optional[str]]:
    """Every backend of ``op`` with None (usable here) or the reason this install cannot run it."""
    registry = _registry(op)
    return {name: registry[name].unavailable_reason() for name in backend_names(op)}


def select_backend(op: str, inputs, requested: str = "auto") -> Backend:
    """The backend that will run ``inputs`` (validated arguments of ``op``, with a ``device``).

    A named backend that refuses raises BackendNotSupportedError with its reasons; ``auto`` takes
    the first backend of :data:`PRIORITY` that accepts the inputs."""
    if requested != "auto":
        backend = get_backend(requested, op)
        reasons = backend.not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(f"backend={requested!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    registry = _registry(op)
    device_type = inputs.device.type
    refused: Dict[str, List[str]] = {}
    for name in PRIORITY[op].get(device_type, (FALLBACK,)):
        backend = registry.get(name)
        if backend is None:  # its module is not part of this install
            refused[name] = ["not registered in this install"]
            continue
        reasons = backend.not_supported_reasons(inputs)
        if reasons:
            refused[name] = reasons
            continue
        if backend.auto_declines(inputs):
            continue  # runnable, but another backend is preferred for these inputs: not a fallback
        if name == FALLBACK and refused:
            detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in refused.items())
            warn_once((op, device_type, detail),
                      f"{op} on {device_type} falls back to the pure-PyTorch path ({detail})",
                      PerformanceWarning, stacklevel=4)
        return backend
    raise BackendNotSupportedError(f"no backend can run these {op} inputs: {refused}")
