"""Triton backward of prefix attention.

Kernels (FlashAttention-2 decomposition, written for this op):
  delta   : delta = rowsum(out * grad_out) - grad_lse                      [B, Hq, Lq]
  kv      : one program per block of sequence keys of one (row, kv head): dk, dv.
  prefix  : one program per block of prefix slots of one row's prompt and kv head: the
            row's share of the prefix gradient, as a per-row partial (deterministic
            mode) or an fp32 atomic add into the prompt's accumulator (atomic mode).
            Both visit every q head of the kv head's group: GQA without copies.
  dq      : one program per block of queries of one (row, q head), like the forward.
  reduce  : deterministic mode: prefix gradient of prompt p = sum of the partials of
            the rows that use p, in row order (bitwise reproducible).
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import (LOG2E, NO_FEATURES, NO_WINDOW, PLAIN, TUNING_KEY, autotune_configs, head_block, interpreting, launcher,
                     length_bucket, prune_by_head_block, remember_arch, tl, triton)
from .forward import (dot_precision, load_rows, padding_view, prefix_index_base, prefix_slot_range, prompt_of_row,
                      refuse_varlen, scores_log2, sequence_key_range, softcap_args, usable_keys, usable_prefix,
                      window_visible)

# Spill-free tuning spaces (see forward.FWD_SPACE); BWD_SPACE serves the kv and prefix kernels.
BWD_SPACE = {
    16: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
         dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",)),
         dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",), when=NO_FEATURES)],
    32: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
         dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2, dtypes=("fp32",)),
         dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2, dtypes=("fp32",))],
    64: [dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2, when=NO_FEATURES),
         dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=2),
         dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3)],
    128: [dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=3),
          dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
          dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2, archs=(90,),
               when=dict(PLAIN, DETERMINISTIC=True))],
    256: [dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2),
          dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2),
          dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)],
}
# The prefix kernel keeps a little more state (its query chunk): its own verified space, without the
# plain-case large tiles and with other float32 tiles.
_PREFIX_FP32 = {16: [dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2, dtypes=("fp32",)),
                     dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2, dtypes=("fp32",))],
                32: [dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",), when=NO_FEATURES),
                     dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2, dtypes=("fp32",))]}
PREFIX_SPACE = {block_d: [c for c in space if "when" not in c and "dtypes" not in c] + _PREFIX_FP32.get(block_d, [])
                for block_d, space in BWD_SPACE.items()}
DQ_SPACE = {
    16: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",))],
    32: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",)),
         dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2, dtypes=("fp32",))],
    64: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, when=NO_FEATURES),
         dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)],
    128: [dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3),
          dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, archs=(90,), when=NO_FEATURES),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, archs=(80,)),
          dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2, archs=(80,), when=NO_FEATURES),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, archs=(90,), when=PLAIN),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, archs=(90,), when=PLAIN)],
    256: [dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2, archs=(80,)),
          dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, archs=(80,))],
}
# The two memory-bound helper kernels run with fixed tiles (also verified by compile_check).
DELTA_BLOCK = dict(BLOCK_M=32, num_warps=8)


def reduce_block(block_d: int) -> int:
    return 16 if block_d >= 256 else 32


# The prefix kernel splits each row's queries into chunks when there are too few (row, kv head,
# slot block) programs to fill the GPU (small K): about two programs per multiprocessor.
_SM_COUNT: dict = {}


def _target_programs(device: torch.device) -> int:
    if interpreting():
        return 8  # small, so that the interpreter tests exercise the split path
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def prefix_query_chunks(device: torch.device, Lq: int, programs: int):
    """(queries per chunk, number of chunks); chunks are whole multiples of every BLOCK_M."""
    granularity = 16 if interpreting() else 128
    wanted = max(1, min(triton.cdiv(Lq, 2 * granularity), triton.cdiv(_target_programs(device), max(programs, 1))))
    chunk = triton.cdiv(triton.cdiv(Lq, wanted), granularity) * granularity
    return chunk, triton.cdiv(Lq, chunk)




@triton.jit
def delta_kernel(OUT, DO, GRAD_LSE, DELTA,
                 stride_ob, stride_oh, stride_om,   # out      [B, Hq, Lq, D]
                 stride_db, stride_dh, stride_dm,   # grad_out [B, Hq, Lq, D]; grad_lse, delta [B, Hq, Lq] fp32
                 Hq, Lq, D,
                 HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * Lq + offs_m
    if HAS_GRAD_LSE:
        delta -= tl.load(GRAD_LSE + row, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Lq)


@triton.jit
def queries_seeing_keys(q_lo, q_hi, first_key, last_key, causal_shift, window,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    """The queries of [q_lo, q_hi) that may see a block of keys of window indices first_key .. last_key (the kv
    and prefix kernels): query m sits at m + causal_shift."""
    if CAUSAL:  # queries before first_key - shift see none of these keys
        q_lo = tl.maximum(q_lo, (tl.maximum(first_key - causal_shift, 0) // BLOCK_M) * BLOCK_M)
    if HAS_WINDOW:  # nor do queries whose window ends before the block's last key
        q_hi = tl.maximum(tl.minimum(q_hi, last_key + window - causal_shift), q_lo)
    return q_lo, q_hi


@triton.jit
def _kv_grads_over_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                           q_lo, q_hi, Lq, offs_n, key_real, causal_shift, D, scale_log2, cap_scale, cap_log2,
                           key_index, window,
                           CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Accumulates dk, dv [BLOCK_N, BLOCK_D] of one key block over queries [q_lo, q_hi) of one head.

    One loop with the masks applied in every step: a single copy of the body keeps the kernel
    within the register file (no spills) at the tile sizes that feed the tensor cores well.
    key_index [BLOCK_N]: the keys' window indices (query m sits at m + causal_shift).
    """
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(q_lo, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Lq, offs_d, D,
                      MASK_ROWS=True, EVEN_D=EVEN_D)
        do = load_rows(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, Lq, offs_d, D,
                       MASK_ROWS=True, EVEN_D=EVEN_D)
        lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf"))
        # a query that saw nothing has lse = -inf and contributes nothing
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
        s_t, t_t = scores_log2(k, q, scale_log2, cap_scale, cap_log2, DOT_PRECISION=DOT_PRECISION,
                               HAS_SOFTCAP=HAS_SOFTCAP)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if CAUSAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_shift, p_t, 0.0)
        if HAS_KEY_MASK:
            p_t = tl.where(key_real[:, None], p_t, 0.0)
        if HAS_WINDOW:
            p_t = tl.where(tl.trans(window_visible(offs_m + causal_shift, key_index, window)), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:  # through the cap: d cap*tanh(s/cap) / ds = 1 - tanh^2
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _kv_grads_over_group(dk, dv, k, v, q_row, do_row, lse_row, delta_row, stride_qh, stride_doh, stride_qm,
                         stride_dom, first_head, group, q_lo, q_hi, Lq, offs_n, key_real, causal_shift, D, scale_log2,
                         cap_scale, cap_log2, key_index, window,
                         CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block over queries [q_lo, q_hi) of every q head of its kv head's group (GQA without
    copies): the kv and prefix kernels. q_row, do_row: the row's q and grad_out; lse_row, delta_row: its [Hq, Lq]."""
    for g in range(0, group):
        h = first_head + g
        dk, dv = _kv_grads_over_queries(
            dk, dv, k, v, q_row + h * stride_qh, do_row + h * stride_doh, lse_row + h * Lq, delta_row + h * Lq,
            stride_qm, stride_dom, q_lo, q_hi, Lq, offs_n, key_real, causal_shift, D, scale_log2, cap_scale,
            cap_log2, key_index, window, CAUSAL=CAUSAL, HAS_KEY_MASK=HAS_KEY_MASK, HAS_WINDOW=HAS_WINDOW,
            HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return dk, dv


@triton.autotune(configs=autotune_configs(BWD_SPACE), key=[k for k in TUNING_KEY if k not in ("HAS_IDS", "HAS_LENS")],
                 prune_configs_by={"early_config_prune": prune_by_head_block(BWD_SPACE)})
@triton.jit
def prefix_attention_bwd_kv_kernel(
    Q, K, V, PADDING, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,     # q        [B, Hq, Lq, D]
    stride_kb, stride_kh, stride_kn,     # k        [B, Hkv, Lk, D]
    stride_vb, stride_vh, stride_vn,     # v        [B, Hkv, Lk, D]
    stride_pb, stride_pn,                # padding  [B, Lk] uint8
    stride_dob, stride_doh, stride_dom,  # grad_out [B, Hq, Lq, D]; lse, delta [B, Hq, Lq] fp32
    stride_dkb, stride_dkh, stride_dkn,  # dk, dv   [B, Hkv, Lk, D] (same strides)
    Hq, Hkv, Lq, Lk, D, group, scale, scale_log2, cap_scale, cap_log2, window,
    lq_bucket, lk_bucket,
    HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one block of sequence keys of one (row, kv head), over all q heads of its group."""
    # float arguments may arrive as fp64 (torch.compile's launcher types Python floats so)
    scale = tl.cast(scale, tl.float32)
    scale_log2 = tl.cast(scale_log2, tl.float32)
    cap_scale = tl.cast(cap_scale, tl.float32)
    cap_log2 = tl.cast(cap_log2, tl.float32)
    bkv = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                  offs_n, Lk, offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
    v = load_rows(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                  offs_n, Lk, offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
    key_real = offs_n < Lk
    if HAS_PADDING:
        key_real = tl.load(PADDING + b * stride_pb + offs_n * stride_pn, mask=offs_n < Lk, other=0) != 0
    causal_shift = Lk - Lq
    q_lo, q_hi = queries_seeing_keys(0, Lq, start_n, start_n + BLOCK_N - 1, causal_shift, window, CAUSAL=CAUSAL,
                                     HAS_WINDOW=HAS_WINDOW, BLOCK_M=BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _kv_grads_over_group(
        dk, dv, k, v, Q + b * stride_qb, DO + b * stride_dob, LSE + b * Hq * Lq, DELTA + b * Hq * Lq, stride_qh,
        stride_doh, stride_qm, stride_dom, kvh * group, group, q_lo, q_hi, Lq, offs_n, key_real, causal_shift, D,
        scale_log2, cap_scale, cap_log2, offs_n, window, CAUSAL=CAUSAL, HAS_KEY_MASK=HAS_PADDING, HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    dk = dk * scale
    dst = b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    seq_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
    tl.store(DK + dst, dk.to(DK.dtype.element_ty), mask=seq_mask)
    tl.store(DV + dst, dv.to(DV.dtype.element_ty), mask=seq_mask)


@triton.autotune(configs=autotune_configs(PREFIX_SPACE), key=TUNING_KEY + ["DETERMINISTIC"],
                 prune_configs_by={"early_config_prune": prune_by_head_block(PREFIX_SPACE)},
                 reset_to_zero=["DPK", "DPV"])
@triton.jit
def prefix_attention_bwd_prefix_kernel(
    Q, PK, PV, PROMPT_IDS, PREFIX_LENS, PREFIX_OFFSETS, DO, LSE, DELTA, DPK, DPV,
    stride_qb, stride_qh, stride_qm,     # q        [B, Hq, Lq, D]
    stride_pkp, stride_pkh, stride_pkn,  # prefix_k [P, Hkv, K, D]
    stride_pvp, stride_pvh, stride_pvn,  # prefix_v [P, Hkv, K, D]
    stride_dob, stride_doh, stride_dom,  # grad_out [B, Hq, Lq, D]; lse, delta [B, Hq, Lq] fp32
    Hq, Hkv, Lq, Lk, K_SLOTS, D, group, scale, scale_log2, cap_scale, cap_log2, window, q_chunk, n_splits,
    lq_bucket, lk_bucket,
    # DPK/DPV: deterministic: partials [B, n_splits, Hkv, K, D] fp32; atomic: sums [P, Hkv, K, D] fp32
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr, HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    DETERMINISTIC: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row's share of the gradient of one block of its prompt's prefix slots (never causally
    masked), over one chunk of its queries: chunks keep enough programs in flight when K is small."""
    # float arguments may arrive as fp64 (torch.compile's launcher types Python floats so)
    scale = tl.cast(scale, tl.float32)
    scale_log2 = tl.cast(scale_log2, tl.float32)
    cap_scale = tl.cast(cap_scale, tl.float32)
    cap_log2 = tl.cast(cap_log2, tl.float32)
    split = tl.program_id(1)
    bkv = tl.program_id(2)
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    prompt, n_slots = prompt_of_row(PROMPT_IDS, PREFIX_LENS, b, K_SLOTS, HAS_IDS=HAS_IDS, HAS_LENS=HAS_LENS)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n < n_slots:
        prompt64 = prompt.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = load_rows(PK + prompt64 * stride_pkp + kvh * stride_pkh + offs_n[:, None] * stride_pkn
                      + offs_d[None, :], offs_n, n_slots, offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
        v = load_rows(PV + prompt64 * stride_pvp + kvh * stride_pvh + offs_n[:, None] * stride_pvn
                      + offs_d[None, :], offs_n, n_slots, offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
        causal_shift = Lk - Lq
        slot_base = prefix_index_base(PREFIX_OFFSETS, b, n_slots, HAS_OFFSETS=HAS_OFFSETS)  # slot 0's window index
        q_lo, q_hi = queries_seeing_keys(split * q_chunk, tl.minimum(split * q_chunk + q_chunk, Lq),
                                         start_n + slot_base, start_n + BLOCK_N - 1 + slot_base, causal_shift,
                                         window, CAUSAL=False, HAS_WINDOW=HAS_WINDOW, BLOCK_M=BLOCK_M)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk, dv = _kv_grads_over_group(
            dk, dv, k, v, Q + b * stride_qb, DO + b * stride_dob, LSE + b * Hq * Lq, DELTA + b * Hq * Lq, stride_qh,
            stride_doh, stride_qm, stride_dom, kvh * group, group, q_lo, q_hi, Lq, offs_n, offs_n, causal_shift, D,
            scale_log2, cap_scale, cap_log2, offs_n + slot_base, window, CAUSAL=False, HAS_KEY_MASK=False,
            HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        dk = dk * scale
        slot_mask = (offs_n < n_slots)[:, None] & (offs_d < D)[None, :]
        if DETERMINISTIC:
            dst = ((b * n_splits + split) * Hkv + kvh) * K_SLOTS * D + offs_n[:, None] * D + offs_d[None, :]
            tl.store(DPK + dst, dk, mask=slot_mask)
            tl.store(DPV + dst, dv, mask=slot_mask)
        else:
            dst = (prompt64 * Hkv + kvh) * K_SLOTS * D + offs_n[:, None] * D + offs_d[None, :]
            tl.atomic_add(DPK + dst, dk, mask=slot_mask)
            tl.atomic_add(DPV + dst, dv, mask=slot_mask)


@triton.jit
def _dq_over_keys(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start, end, q_pos,
                  causal_shift, pad_base, stride_pn, D, scale_log2, cap_scale, cap_log2, key_index_base, window,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq += dS @ K over key blocks [start, end). Keys past `end` load as zeros and add nothing.
    Key n has window index key_index_base + n."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, end, offs_d, D,
                      MASK_ROWS=MASKED, EVEN_D=EVEN_D)
        v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, end, offs_d, D,
                      MASK_ROWS=MASKED, EVEN_D=EVEN_D)
        s, t = scores_log2(q, k, scale_log2, cap_scale, cap_log2, DOT_PRECISION=DOT_PRECISION,
                           HAS_SOFTCAP=HAS_SOFTCAP)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED and CAUSAL:
            p = tl.where(offs_n[None, :] <= q_pos[:, None] + causal_shift, p, 0.0)
        if HAS_PADDING:
            real = tl.load(pad_base + offs_n * stride_pn, mask=offs_n < end, other=0) != 0
            p = tl.where(real[None, :], p, 0.0)
        if HAS_WINDOW:
            p = tl.where(window_visible(q_pos + causal_shift, key_index_base + offs_n, window), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=autotune_configs(DQ_SPACE), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_by_head_block(DQ_SPACE)})
@triton.jit
def prefix_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, PROMPT_IDS, PREFIX_LENS, PADDING, PREFIX_OFFSETS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,     # q        [B, Hq, Lq, D]
    stride_kb, stride_kh, stride_kn,     # k        [B, Hkv, Lk, D]
    stride_vb, stride_vh, stride_vn,     # v        [B, Hkv, Lk, D]
    stride_pkp, stride_pkh, stride_pkn,  # prefix_k [P, Hkv, K, D]
    stride_pvp, stride_pvh, stride_pvn,  # prefix_v [P, Hkv, K, D]
    stride_pb, stride_pn,                # padding  [B, Lk] uint8
    stride_dob, stride_doh, stride_dom,  # grad_out [B, Hq, Lq, D]; lse, delta [B, Hq, Lq] fp32
    stride_dqb, stride_dqh, stride_dqm,  # dq       [B, Hq, Lq, D]
    Hq, Lq, Lk, K_SLOTS, D, group, scale, scale_log2, cap_scale, cap_log2, window,
    lq_bucket, lk_bucket,
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr, HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # float arguments may arrive as fp64 (torch.compile's launcher types Python floats so)
    scale = tl.cast(scale, tl.float32)
    scale_log2 = tl.cast(scale_log2, tl.float32)
    cap_scale = tl.cast(cap_scale, tl.float32)
    cap_log2 = tl.cast(cap_log2, tl.float32)
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // group).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Lq,
                  offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
    do = load_rows(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m,
                   Lq, offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
    row = bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row + offs_m, mask=offs_m < Lq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_shift = Lk - Lq
    reach = start_m * BLOCK_M + causal_shift - window + 1  # the smallest key index the block may see
    # the prefix: one loop, every visited slot block masked
    prompt, n_slots, slot_base, slots_lo, _ = prefix_slot_range(
        PROMPT_IDS, PREFIX_LENS, PREFIX_OFFSETS, b, K_SLOTS, reach, HAS_IDS=HAS_IDS, HAS_LENS=HAS_LENS,
        HAS_OFFSETS=HAS_OFFSETS, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N)
    dq = _dq_over_keys(
        dq, q, do, lse2, delta, PK + prompt * stride_pkp + kvh * stride_pkh,
        PV + prompt * stride_pvp + kvh * stride_pvh, stride_pkn, stride_pvn, slots_lo, n_slots, offs_m, causal_shift,
        PADDING, 0, D, scale_log2, cap_scale, cap_log2, slot_base, window, MASKED=True, CAUSAL=False,
        HAS_PADDING=False, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)

    # the row's own keys, as in the forward: unmasked blocks below the diagonal, then the masked band
    lo, free_end, hi = sequence_key_range(start_m, causal_shift, Lk, reach, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW,
                                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    pad_base = PADDING + b * stride_pb
    if not HAS_WINDOW:
        dq = _dq_over_keys(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, free_end, offs_m, causal_shift,
            pad_base, stride_pn, D, scale_log2, cap_scale, cap_log2, 0, window, MASKED=False, CAUSAL=CAUSAL,
            HAS_PADDING=HAS_PADDING, HAS_WINDOW=False, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D,
            DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dq = _dq_over_keys(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, free_end, hi, offs_m, causal_shift, pad_base,
        stride_pn, D, scale_log2, cap_scale, cap_log2, 0, window, MASKED=True, CAUSAL=CAUSAL, HAS_PADDING=HAS_PADDING,
        HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :])


@triton.jit
def reduce_prefix_grads_kernel(PARTIAL, PROMPT_IDS, PREFIX_LENS, OUT,
                               B, n_splits, Hkv, K_SLOTS, D,  # partial [B, n_splits, Hkv, K, D] fp32 -> out [P, Hkv, K, D]
                               HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    ph = tl.program_id(0)
    prompt = ph // Hkv
    kvh = ph % Hkv
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    n_slots = K_SLOTS
    if HAS_LENS:
        n_slots = tl.load(PREFIX_LENS + prompt).to(tl.int32)
    mask = (offs_s < n_slots)[:, None] & (offs_d < D)[None, :]
    tile = offs_s[:, None] * D + offs_d[None, :]
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for b in range(0, B):
        row_prompt = 0
        if HAS_IDS:
            row_prompt = tl.load(PROMPT_IDS + b).to(tl.int32)
        if row_prompt == prompt:
            for split in range(0, n_splits):
                part = ((b * n_splits + split) * Hkv + kvh).to(tl.int64) * K_SLOTS * D
                acc += tl.load(PARTIAL + part + tile, mask=mask, other=0.0)
    out = OUT + ph.to(tl.int64) * K_SLOTS * D + tile
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(offs_s < K_SLOTS)[:, None] & (offs_d < D)[None, :])


def _bshd_empty(shape, like):
    B, H, L, D = shape
    return torch.empty((B, L, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def prefix_attention_bwd(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens,
                         key_padding_mask, out, lse, causal: bool, scale: float, deterministic: bool = True,
                         seq_grads: bool = True, prefix_grads: bool = True, window: Optional[int] = None,
                         softcap: Optional[float] = None, prefix_offsets: Optional[torch.Tensor] = None,
                         sinks: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None):
    """Launches the backward kernels; returns (dq, dk, dv, dprefix_k, dprefix_v). ``sinks`` are not read: the
    forward's lse includes them (ops/prefix_attention/autograd.py computes their own gradient).

    ``seq_grads=False`` skips the dk/dv and dq kernels, ``prefix_grads=False`` the prefix kernel
    (autograd's needs_input_grad); gradients not computed come back empty, shape [0].
    """
    refuse_varlen(cu_seqlens)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[0]
    if seq_grads:
        dq, dk, dv = _bshd_empty(q.shape, q), _bshd_empty(k.shape, k), _bshd_empty(v.shape, v)
    else:
        dq, dk, dv = q.new_empty(0), q.new_empty(0), q.new_empty(0)
    if prefix_grads:
        dprefix_k = torch.zeros_like(prefix_k, memory_format=torch.contiguous_format)
        dprefix_v = torch.zeros_like(prefix_v, memory_format=torch.contiguous_format)
    else:
        dprefix_k, dprefix_v = q.new_empty(0), q.new_empty(0)
    # Lk = 0 (prefix-only attention) is not an early return: dq and the prefix gradients still come from
    # the prefix; only the dk/dv kernel has no keys to run over.
    if B * Hkv == 0 or D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dprefix_k, dprefix_v
    if Lq == 0:
        return dq, dk.zero_(), dv.zero_(), dprefix_k, dprefix_v
    remember_arch(q.device)
    k, v, key_padding_mask = usable_keys(q, k, v, key_padding_mask)  # Lk was read above: 0 stays 0
    block_d = head_block(D)
    common = dict(BLOCK_D=block_d, EVEN_D=block_d == D, DOT_PRECISION=dot_precision(q.dtype))

    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    launcher(delta_kernel)[(triton.cdiv(Lq, DELTA_BLOCK["BLOCK_M"]), B * Hq)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        Hq, Lq, D, HAS_GRAD_LSE=grad_lse is not None, BLOCK_M=DELTA_BLOCK["BLOCK_M"], BLOCK_D=block_d,
        num_warps=DELTA_BLOCK["num_warps"])

    pad, stride_pb, stride_pn = padding_view(key_padding_mask, q)
    pk, pv, ids, lens, n_slots = usable_prefix(q, prefix_k, prefix_v, prompt_ids, prefix_lens)
    q_chunk, n_splits = prefix_query_chunks(q.device, Lq, B * Hkv * triton.cdiv(n_slots, 64))
    n_slots_grad = n_slots if prefix_grads else 0  # the prefix still feeds dq either way
    if n_slots_grad == 0:
        grad_pk = grad_pv = None  # no prefix kernel runs
    elif deterministic:
        grad_pk = torch.empty((B, n_splits, Hkv, n_slots, D), dtype=torch.float32, device=q.device)
        grad_pv = torch.empty_like(grad_pk)
    else:
        grad_pk = torch.zeros((P, Hkv, n_slots, D), dtype=torch.float32, device=q.device)
        grad_pv = torch.zeros_like(grad_pk)
    features = dict(HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None)
    offsets = prefix_offsets if prefix_offsets is not None else q
    has_offsets = dict(HAS_OFFSETS=prefix_offsets is not None)
    feature_args = (*softcap_args(scale, softcap), window if window is not None else NO_WINDOW)
    flags = dict(HAS_IDS=ids is not None, HAS_LENS=lens is not None, HAS_PADDING=key_padding_mask is not None,
                 CAUSAL=causal, **features, **common)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), pk.stride(0), pk.stride(1), pk.stride(2),
               pv.stride(0), pv.stride(1), pv.stride(2), stride_pb, stride_pn,
               grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    buckets = (length_bucket(Lq), length_bucket(Lk))

    def kv_grid(meta):
        return (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)

    if seq_grads and Lk > 0:  # an empty grid: dk, dv are [B, Hkv, 0, D]
        launcher(prefix_attention_bwd_kv_kernel)[kv_grid](
            q, k, v, pad, grad_out, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), stride_pb, stride_pn,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            Hq, Hkv, Lq, Lk, D, Hq // Hkv, scale, scale * LOG2E, *feature_args, *buckets,
            HAS_PADDING=key_padding_mask is not None, CAUSAL=causal, **features, **common)

    if n_slots_grad > 0:
        def prefix_grid(meta):
            return (triton.cdiv(n_slots, meta["BLOCK_N"]), n_splits, B * Hkv)

        launcher(prefix_attention_bwd_prefix_kernel)[prefix_grid](
            q, pk, pv, ids if ids is not None else q, lens if lens is not None else q, offsets, grad_out, lse, delta,
            grad_pk, grad_pv, q.stride(0), q.stride(1), q.stride(2), pk.stride(0), pk.stride(1), pk.stride(2),
            pv.stride(0), pv.stride(1), pv.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            Hq, Hkv, Lq, Lk, n_slots, D, Hq // Hkv, scale, scale * LOG2E, *feature_args, q_chunk, n_splits, *buckets,
            DETERMINISTIC=deterministic, **has_offsets,
            **flags)

    def dq_grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)

    if seq_grads:
        launcher(prefix_attention_bwd_dq_kernel)[dq_grid](
            q, k, v, pk, pv, ids if ids is not None else q, lens if lens is not None else q, pad, offsets, grad_out,
            lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Lq, Lk, n_slots, D, Hq // Hkv, scale, scale * LOG2E, *feature_args, *buckets, **has_offsets, **flags)

    if n_slots_grad > 0:
        if deterministic:
            block_s = reduce_block(block_d)
            for partial, dst in ((grad_pk, dprefix_k), (grad_pv, dprefix_v)):
                launcher(reduce_prefix_grads_kernel)[(P * Hkv, triton.cdiv(n_slots, block_s))](
                    partial, ids if ids is not None else q, lens if lens is not None else q, dst, B, n_splits,
                    Hkv, n_slots, D, HAS_IDS=ids is not None, HAS_LENS=lens is not None, BLOCK_S=block_s,
                    BLOCK_D=block_d)
        else:
            dprefix_k.copy_(grad_pk)
            dprefix_v.copy_(grad_pv)
    return dq, dk, dv, dprefix_k, dprefix_v
