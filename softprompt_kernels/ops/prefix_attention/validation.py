"""Argument checks for ``prefix_attention``: one place, every backend.

Every rejection names the argument and what was expected. Shape, dtype and device
checks read only metadata (no device work). Value-range checks of ``prompt_ids``
and ``prefix_lens`` read host tensors directly; on an accelerator they become an
asynchronous device assertion so that the hot path never waits on the device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...common import INDEX_DTYPES, SUPPORTED_DTYPES
from ...errors import InvalidArgumentError, InvalidDtypeError
from .contract import CONTRACT, PrefixAttentionInputs

def _fail(message: str) -> None:
    raise InvalidArgumentError(message)


def _check_tensor(value, name: str, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidDtypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dim() != rank:
        _fail(f"{name} must have rank {rank} with shape {layout}, got shape {tuple(value.shape)}")
    return value


def _check_same_device(value: torch.Tensor, name: str, q: torch.Tensor) -> None:
    if value.device != q.device:
        _fail(f"{name} must be on q's device {q.device}, got {value.device}")


def _check_index_tensor(value, name: str, length: int, length_name: str, q: torch.Tensor) -> torch.Tensor:
    value = _check_tensor(value, name, 1, f"[{length_name}]")
    if value.dtype not in INDEX_DTYPES:
        raise InvalidDtypeError(f"{name} must be an int32 or int64 tensor, got {value.dtype}")
    if value.shape[0] != length:
        _fail(f"{name} must have shape [{length_name}={length}], got {tuple(value.shape)}")
    _check_same_device(value, name, q)
    return value


def validate(**arguments) -> PrefixAttentionInputs:
    """Checks the op contract of docs/DESIGN.md section 2 and returns the validated inputs: the arguments of
    contract.ARGS by name (left out: their defaults), one check each."""
    args = CONTRACT.complete(arguments)
    q = _check_tensor(args["q"], "q", 4, "[B, Hq, Lq, D]")
    k = _check_tensor(args["k"], "k", 4, "[B, Hkv, Lk, D]")
    v = _check_tensor(args["v"], "v", 4, "[B, Hkv, Lk, D]")
    prefix_k = _check_tensor(args["prefix_k"], "prefix_k", 4, "[P, Hkv, K, D]")
    prefix_v = _check_tensor(args["prefix_v"], "prefix_v", 4, "[P, Hkv, K, D]")
    causal, window = args["causal"], args["window"]

    if q.dtype not in SUPPORTED_DTYPES:
        raise InvalidDtypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise InvalidDtypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _check_same_device(t, name, q)

    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    P, _, K, _ = prefix_k.shape
    if D < 1:
        _fail(f"q must have a head dimension D >= 1, got shape {tuple(q.shape)}")
    # k is checked against q and the prefix bank before v against k, so that a wrong k is named as k.
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B or t.shape[3] != D:
            _fail(f"{name} must have shape [B={B}, Hkv, Lk, D={D}] (q's batch and head dim), got {tuple(t.shape)}")
    if v.shape != k.shape:
        _fail(_k_v_mismatch(k, v, prefix_k))
    if Hkv < 1 or Hq % Hkv != 0:
        _fail(f"q's head count Hq={Hq} must be a multiple of k's head count Hkv={Hkv}")
    if Lq > Lk and not (Lk == 0 and not causal and window is None):
        # Bottom-right alignment puts query i at key index i + Lk - Lq: with Lq > Lk that index is negative and
        # causality or a window would be ill-defined. Prefix-only attention (no sequence keys at all, a query sees
        # its prompt's prefix only: ADAPTION_PROMPT's separate softmax) has neither and is allowed.
        _fail(f"q's length Lq={Lq} must not exceed k's length Lk={Lk} (queries are the last Lq keys); "
              "Lq > Lk is allowed only for prefix-only attention: Lk=0, causal=False and window=None, "
              f"got causal={causal!r}, window={window!r}")
    if prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        _fail(f"prefix_k must have shape [P, Hkv={Hkv}, K, D={D}], got {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        _fail(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")

    prompt_ids, prefix_lens, key_padding_mask = args["prompt_ids"], args["prefix_lens"], args["key_padding_mask"]
    # per-row arguments are per sequence with variable-length rows
    rows, row_name = (B, "B") if args["cu_seqlens"] is None else (_check_varlen(args, q, k, key_padding_mask), "S")
    if prompt_ids is None:
        if P != 1:
            _fail(f"prompt_ids=None means every row uses the one prefix, so prefix_k must hold exactly "
                  f"one prompt (P=1); got P={P}: pass prompt_ids [B] with values in [-1, {P})")
    else:
        prompt_ids = _check_index_tensor(prompt_ids, "prompt_ids", rows, row_name, q)
    if prefix_lens is not None:
        prefix_lens = _check_index_tensor(prefix_lens, "prefix_lens", P, "P", q)
    if key_padding_mask is not None:
        key_padding_mask = _check_tensor(key_padding_mask, "key_padding_mask", 2, "[B, Lk]")
        if key_padding_mask.dtype != torch.bool:
            raise InvalidDtypeError(
                f"key_padding_mask must be a bool tensor (True = real token), got {key_padding_mask.dtype}; "
                "convert a 0/1 attention mask with .bool()")
        if tuple(key_padding_mask.shape) != (B, Lk):
            _fail(f"key_padding_mask must have shape [B={B}, Lk={Lk}], got {tuple(key_padding_mask.shape)}")
        _check_same_device(key_padding_mask, "key_padding_mask", q)
    if not isinstance(causal, bool):
        raise InvalidDtypeError(f"causal must be a bool, got {type(causal).__name__}")
    sinks, prefix_offsets = args["sinks"], args["prefix_offsets"]
    if sinks is not None:
        sinks = _check_tensor(sinks, "sinks", 1, "[Hq]")
        if not sinks.dtype.is_floating_point:
            raise InvalidDtypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
        if sinks.shape[0] != Hq:
            _fail(f"sinks must have shape [Hq={Hq}] (one logit per q head), got {tuple(sinks.shape)}")
        _check_same_device(sinks, "sinks", q)
    if prefix_offsets is not None:
        prefix_offsets = _check_index_tensor(prefix_offsets, "prefix_offsets", rows, row_name, q)
    normalised = dict(scale=_check_scale(args["scale"], D), window=_check_window(window),
                      softcap=_check_softcap(args["softcap"]), dropout_p=_check_dropout(args["dropout_p"]))
    return PrefixAttentionInputs(**{**args, **normalised})


def _check_varlen(args, q: torch.Tensor, k: torch.Tensor, key_padding_mask) -> int:
    """Shape checks of variable-length rows (cu_seqlens); returns the number of sequences S."""
    cu_seqlens = _check_tensor(args["cu_seqlens"], "cu_seqlens", 1, "[S + 1]")
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise InvalidDtypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.shape[0] < 1:
        _fail("cu_seqlens must have shape [S + 1] with S >= 0 (it starts with 0), got shape (0,)")
    _check_same_device(cu_seqlens, "cu_seqlens", q)
    B, _, Lq, _ = q.shape
    if B != 1 or k.shape[2] != Lq:
        _fail(f"with cu_seqlens, q and k must hold one packed row of all the sequences' tokens: B=1 and Lq=Lk=total, "
              f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if key_padding_mask is not None:
        _fail("key_padding_mask must be None with cu_seqlens (packed rows have no padding: the sequences' bounds "
              "say which keys each query sees)")
    return cu_seqlens.shape[0] - 1


def _check_window(window) -> Optional[int]:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise InvalidDtypeError(f"window must be a positive int or None, got {type(window).__name__}")
    if window < 1:
        _fail(f"window must be >= 1 (a query sees keys less than window positions before it), got {window}")
    return int(window)


def _check_softcap(softcap) -> Optional[float]:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise InvalidDtypeError(f"softcap must be a positive real number or None, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        _fail(f"softcap must be finite and > 0, got {softcap}")
    return float(softcap)


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise InvalidDtypeError(f"dropout_p must be a real number in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _k_v_mismatch(k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor) -> str:
    """Names the one of k and v that disagrees, where the prefix bank's head count tells which."""
    heads = prefix_k.shape[1]
    for name, t, other in (("k", k, "v"), ("v", v, "k")):
        if t.shape[1] != heads and (v if name == "k" else k).shape[1] == heads:
            return f"{name} must have Hkv={heads} heads like {other} and prefix_k, got shape {tuple(t.shape)}"
    return f"k and v must have the same shape [B, Hkv, Lk, D], got k {tuple(k.shape)} and v {tuple(v.shape)}"


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidDtypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        _fail(f"scale must be finite, got {scale}")
    return float(scale)


def check_index_values(inputs: PrefixAttentionInputs) -> None:
    """Range checks of prompt_ids, prefix_lens, prefix_offsets and cu_seqlens, without a device sync.

    Host tensors are checked here directly. On an accelerator the check is queued
    as a device-side assertion (reported when the stream next synchronises).
    """
    P, K = inputs.num_prompts, inputs.prefix_slots
    checks = []
    if inputs.prompt_ids is not None and inputs.batch > 0:
        checks.append((inputs.prompt_ids, -1, P - 1, f"prompt_ids must lie in [-1, P={P})"))
    if inputs.prefix_lens is not None and P > 0:
        checks.append((inputs.prefix_lens, 0, K, f"prefix_lens must lie in [0, K={K}]"))
    if inputs.prefix_offsets is not None and inputs.batch > 0 and inputs.cu_seqlens is None:
        Lk = inputs.len_k
        checks.append((inputs.prefix_offsets, 0, Lk, f"prefix_offsets must lie in [0, Lk={Lk}]"))
    if inputs.cu_seqlens is not None:
        checks.extend(_varlen_value_checks(inputs))
    for values, low, high, message in checks:
        if values.numel() == 0:
            continue
        if values.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(values.min()), int(values.max())
            if lo < low or hi > high:
                _fail(f"{message}, got values in [{lo}, {hi}]")
        else:
            torch._assert_async(((values >= low) & (values <= high)).all(), message)


def _varlen_value_checks(inputs: PrefixAttentionInputs):
    """(values, low, high, message) range checks of variable-length rows: cu_seqlens runs from 0 to the total token
    count without decreasing; a sequence's prefix offset lies within it."""
    cu_seqlens, total = inputs.cu_seqlens, inputs.len_q
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    checks = [(cu_seqlens[:1], 0, 0, "cu_seqlens must start with 0"),
              (cu_seqlens[-1:], total, total, f"cu_seqlens must end with the total token count Lq={total}"),
              (lengths, 0, total, "cu_seqlens must not decrease")]
    if inputs.prefix_offsets is not None:
        message = "prefix_offsets[s] must lie in [0, length of sequence s]"
        checks += [(inputs.prefix_offsets, 0, total, message), (lengths - inputs.prefix_offsets, 0, total, message)]
    return checks
