"""Shared pieces of the Triton prefix-attention kernels: availability, launch wrapper, tuning spaces."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # the package works without triton; the backend reports why it is missing
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not installed ({exc})"

LOG2E = 1.4426950408889634
# "no sliding window": larger than any length a kernel sees (kept within int32, the kernels' index type)
NO_WINDOW = 1 << 30


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launcher(kernel):
    """The kernel as torch.compile can trace it (wrap_triton), or as is under the interpreter."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


def head_block(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 inside the kernels (80 -> 128, 96 -> 128)."""
    return max(16, triton.next_power_of_2(head_dim))


def length_bucket(length: int) -> int:
    """Autotuning key for a length: powers of two from 64 to 16384, so first use tunes a handful of keys."""
    return min(16384, max(64, triton.next_power_of_2(max(length, 1))))


# Autotuning keys: everything that changes which configs are allowed or which is fastest.
TUNING_KEY = ["BLOCK_D", "EVEN_D", "CAUSAL", "HAS_PADDING", "HAS_IDS", "HAS_LENS", "HAS_WINDOW", "HAS_SOFTCAP",
              "DOT_PRECISION",
              "lq_bucket", "lk_bucket"]
# Flags of the common fast case (one prompt, no padding, head dim a power of two).
# Without the sliding window and soft-capping (their masks and tanh values cost registers): the
# condition of tiles that spill with them (compile_check).
NO_FEATURES = {"HAS_WINDOW": False, "HAS_SOFTCAP": False}
PLAIN = {"HAS_PADDING": False, "HAS_IDS": False, "HAS_LENS": False, **NO_FEATURES, "EVEN_D": True}

# Small blocks under the interpreter, so that tests at small shapes still cross block boundaries.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


_NOT_BLOCKS = ("num_warps", "num_stages", "archs", "dtypes", "when")
ALL_ARCHS = (80, 90)
HALF_DTYPES = ("bf16", "fp16")  # a config's default dtypes; float32 entries name ("fp32",)
# float32 runs on tiles without tensor-core-friendly shapes; only these padded head dims have
# spill-free float32 tiles for every kernel (compile_check), larger ones are refused.
FP32_HEAD_BLOCKS = (16, 32)


def dtype_family(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


_ARCH_FAMILY: Dict[int, int] = {}


def remember_arch(device: torch.device) -> None:
    """Records the GPU family of a device (launchers call it eagerly, so that the pruning hook,
    which torch.compile may trace, only reads a dict)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _ARCH_FAMILY:
            major, _ = torch.cuda.get_device_capability(index)
            # spaces are verified (compile_check) for sm_80 and sm_90; newer parts use sm_90's
            _ARCH_FAMILY[index] = 90 if major >= 9 else 80


def arch_family(device: torch.device) -> int:
    return _ARCH_FAMILY.get(device.index if device.index is not None else 0, 90)


def autotune_configs(space_by_head_block: Dict[int, List[dict]]) -> list:
    """All configs of a tuning space (head dim -> configs), as triton.Config objects.

    A config may name the architectures (``archs``; default both) and the dtypes (``dtypes``;
    default bf16 and fp16) it is verified for, and the kernel flags it needs (``when``, e.g.
    ``{"HAS_PADDING": False}``: larger tiles that fit the register file only without them).
    """
    if interpreting():
        return [triton.Config(dict(INTERPRETER_BLOCKS), num_warps=4, num_stages=1)]
    seen, out = set(), []
    for space in space_by_head_block.values():
        for c in space:
            key = config_key(c)
            if key not in seen:
                seen.add(key)
                out.append(_to_config(c))
    return out


def prune_by_head_block(space_by_head_block: Dict[int, List[dict]]):
    """early_config_prune hook: the configs listed for the call's padded head dim, GPU family and dtype."""

    def prune(configs_in, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        tensor = next(v for v in named_args.values() if isinstance(v, torch.Tensor))  # the first: q or out
        family, dtype = arch_family(tensor.device), dtype_family(tensor.dtype)
        allowed = {config_key(c) for c in space_by_head_block.get(block_d, [])
                   if family in c.get("archs", ALL_ARCHS) and dtype in c.get("dtypes", HALF_DTYPES)
                   and all(kwargs.get(flag, value) == value for flag, value in c.get("when", {}).items())}
        kept = [c for c in configs_in
                if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) in allowed]
        if not kept:  # the backend refuses such inputs first; this guards the tables themselves
            raise RuntimeError(f"no verified Triton config for head block {block_d}, sm_{family}, {dtype}")
        return kept

    return prune


def config_key(c: dict):
    blocks = tuple(sorted((k, v) for k, v in c.items() if k not in _NOT_BLOCKS))
    return blocks, c["num_warps"], c["num_stages"]


def _to_config(c: dict):
    blocks = {k: v for k, v in c.items() if k not in _NOT_BLOCKS}
    return triton.Config(blocks, num_warps=c["num_warps"], num_stages=c["num_stages"])
