"""Triton forward of prefix attention (FlashAttention-2 style, written for this op).

One program = one block of BLOCK_M queries of one (row, q head). It streams first
the valid prefix slots of the row's prompt (never causally masked), then the row's
visible sequence keys: blocks wholly below the causal diagonal run without masks,
only the diagonal (and, with padding, every block) is masked; blocks above it are
never visited. With a sliding window, blocks before the first query's reach are not
visited either (work ~ Lq * window) and the visited ones are masked. Soft-capping
applies ``cap * tanh(s / cap)`` to the scores; attention sinks join the normaliser in
the epilogue. Online softmax in fp32 in base 2; out and lse (natural log) written.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .common import (LOG2E, NO_FEATURES, NO_WINDOW, PLAIN, TUNING_KEY, autotune_configs, head_block, launcher, length_bucket,
                     prune_by_head_block, remember_arch, tl, triton)

# Tuning space per padded head dim (BLOCK_D). Every entry compiles without register spills
# for the GPU families it names (default sm_80 and sm_90) and the dtypes it names (default
# bf16 and fp16): `python -m softprompt_kernels.triton.compile_check` verifies it in CI.
FWD_SPACE = {
    16: [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",)),
         dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2, dtypes=("fp32",))],
    32: [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",), when=NO_FEATURES),
         dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2, dtypes=("fp32",))],
    64: [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)],
    128: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
          dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
          dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, archs=(80,)),
          # 128-query tiles fit sm_90's register file only in the plain causal case
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, archs=(90,), when=dict(PLAIN, CAUSAL=True)),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, archs=(90,), when=dict(PLAIN, CAUSAL=True))],
    # sm_90 at head dim 256: no wgmma-sized tile fits the register file (all spilled), mma.sync tiles do
    256: [dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2, archs=(80,)),
          dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, archs=(80,))],
}


@triton.jit
def load_rows(ptrs, offs_rows, n_rows, offs_d, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Loads a [rows, BLOCK_D] tile, masking rows >= n_rows and columns >= D only where needed."""
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=(offs_rows < n_rows)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_rows < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return tile


@triton.jit
def tanh(x):
    """tanh from one exp (Triton has no portable tanh), saturating to +-1; the fast division (a couple of
    ulp, no IEEE slow path with its stack frame) is ample for soft-capped scores."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = tl.fdiv(1.0 - e, 1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def scores_log2(q, k, scale_log2, cap_scale, cap_log2, DOT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores in base-2 units, soft-capped (cap * tanh(s / cap), s the scaled score) when HAS_SOFTCAP.
    Returns (scores, tanh) [rows, cols]; tanh is what the backward needs for the cap's derivative."""
    dot = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        t = tanh(dot * cap_scale)
        return t * cap_log2, t
    return dot * scale_log2, dot


@triton.jit
def prefix_index_base(PREFIX_OFFSETS, b, n_slots, HAS_OFFSETS: tl.constexpr):
    """Window index of slot 0 of row b's prefix: -n_slots, shifted by the row's prefix offset when given."""
    if HAS_OFFSETS:
        return tl.load(PREFIX_OFFSETS + b).to(tl.int32) - n_slots
    return -n_slots


@triton.jit
def window_visible(query_index, key_index, window):
    """[rows, cols] bool: the key is within the query's sliding window (index difference < window)."""
    return (query_index[:, None] - key_index[None, :]) < window


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, end,
                       q_pos, causal_shift, pad_base, stride_pn, D, scale_log2, cap_scale, cap_log2,
                       key_index_base, window,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax update over keys [start, end). MASKED: bounds (and causal, if CAUSAL) masks.
    Key n of the span has window index key_index_base + n; query m has q_pos + causal_shift."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, end, offs_d, D,
                      MASK_ROWS=MASKED, EVEN_D=EVEN_D)
        qk, _ = scores_log2(q, k, scale_log2, cap_scale, cap_log2, DOT_PRECISION=DOT_PRECISION,
                            HAS_SOFTCAP=HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        if HAS_WINDOW:
            qk = tl.where(window_visible(q_pos + causal_shift, key_index_base + offs_n, window), qk, float("-inf"))
        if MASKED:  # one comparison per score: the row's last visible key (bounds and causality)
            if CAUSAL:
                last_key = tl.minimum(q_pos + causal_shift, end - 1)
                qk = tl.where(offs_n[None, :] <= last_key[:, None], qk, float("-inf"))
            else:
                qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
        if HAS_PADDING:
            real = tl.load(pad_base + offs_n * stride_pn, mask=offs_n < end, other=0) != 0
            qk = tl.where(real[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, end, offs_d, D,
                      MASK_ROWS=MASKED, EVEN_D=EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def prompt_of_row(PROMPT_IDS, PREFIX_LENS, b, K_SLOTS, HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr):
    """(prompt id, number of its valid prefix slots) of row b; -1 and 0 when the row has none."""
    if HAS_IDS:
        prompt = tl.load(PROMPT_IDS + b).to(tl.int32)
    else:
        prompt = tl.full([], 0, tl.int32)
    if HAS_LENS:
        n_slots = tl.load(PREFIX_LENS + tl.maximum(prompt, 0)).to(tl.int32)
    else:
        n_slots = tl.full([], K_SLOTS, tl.int32)
    n_slots = tl.where(prompt >= 0, n_slots, 0)
    return prompt, n_slots


@triton.jit
def prefix_slot_range(PROMPT_IDS, PREFIX_LENS, PREFIX_OFFSETS, b, K_SLOTS, reach,
                      HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The prefix slots a block of queries visits (forward and dq): (prompt index, n_slots, slot_base, slots_lo,
    slots_free). Slot s has window index slot_base + s; slots before slots_lo lie before the first query's reach
    (``reach``: the smallest key index it may see) and are skipped; [slots_lo, slots_free) need no mask (none with a
    window) and [slots_free, n_slots) are masked."""
    prompt, n_slots = prompt_of_row(PROMPT_IDS, PREFIX_LENS, b, K_SLOTS, HAS_IDS=HAS_IDS, HAS_LENS=HAS_LENS)
    prompt = tl.maximum(prompt, 0).to(tl.int64)
    slot_base = prefix_index_base(PREFIX_OFFSETS, b, n_slots, HAS_OFFSETS=HAS_OFFSETS)
    if HAS_WINDOW:
        slots_lo = (tl.minimum(tl.maximum(reach - slot_base, 0), n_slots) // BLOCK_N) * BLOCK_N
        slots_free = slots_lo
    else:
        slots_lo = 0
        slots_free = (n_slots // BLOCK_N) * BLOCK_N
    return prompt, n_slots, slot_base, slots_lo, slots_free


@triton.jit
def sequence_key_range(start_m, causal_shift, Lk, reach,
                       CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """The sequence keys a block of queries visits (forward and dq): (lo, free_end, hi). Keys [lo, free_end) are
    below every query's causal diagonal and need no mask; [free_end, hi) are masked (the diagonal band, and with a
    window every visited block, from the first query's reach); keys past hi are never visited."""
    if CAUSAL:
        free_end = tl.minimum(start_m * BLOCK_M + causal_shift + 1, Lk)
        hi = tl.minimum((start_m + 1) * BLOCK_M + causal_shift, Lk)
    else:
        free_end = Lk
        hi = Lk
    if HAS_WINDOW:
        lo = (tl.minimum(tl.maximum(reach, 0), hi) // BLOCK_N) * BLOCK_N
        free_end = lo
    else:
        lo = 0
        free_end = (free_end // BLOCK_N) * BLOCK_N
    return lo, free_end, hi


@triton.autotune(configs=autotune_configs(FWD_SPACE), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_by_head_block(FWD_SPACE)})
@triton.jit
def prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, PROMPT_IDS, PREFIX_LENS, PADDING, SINKS, PREFIX_OFFSETS, OUT, LSE,
    stride_qb, stride_qh, stride_qm,     # q           [B, Hq, Lq, D]
    stride_kb, stride_kh, stride_kn,     # k           [B, Hkv, Lk, D]
    stride_vb, stride_vh, stride_vn,     # v           [B, Hkv, Lk, D]
    stride_pkp, stride_pkh, stride_pkn,  # prefix_k    [P, Hkv, K, D]
    stride_pvp, stride_pvh, stride_pvn,  # prefix_v    [P, Hkv, K, D]
    stride_pb, stride_pn,                # padding     [B, Lk] uint8 (1 = real token)
    stride_ob, stride_oh, stride_om,     # out         [B, Hq, Lq, D]; lse [B, Hq, Lq] contiguous fp32
    Hq, Lq, Lk, K_SLOTS, D, group, scale_log2,
    cap_scale, cap_log2, window,         # softcap: scale / cap and cap * log2(e); sliding window; sinks [Hq] fp32;
                                         # prefix_offsets [B] int64
    lq_bucket, lk_bucket,                # autotuning keys only
    HAS_IDS: tl.constexpr, HAS_LENS: tl.constexpr, HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # float arguments may arrive as fp64 (torch.compile's launcher types Python floats so):
    # fp32 keeps every product and the dot accumulators fp32
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

    q = load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                  offs_m, Lq, offs_d, D, MASK_ROWS=True, EVEN_D=EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_shift = Lk - Lq
    # With a sliding window: the smallest key index the block's first query can reach.
    reach = start_m * BLOCK_M + causal_shift - window + 1

    # The prompt's prefix: visible to every query of the row, never causally masked.
    prompt, n_slots, slot_base, slots_lo, slots_free = prefix_slot_range(
        PROMPT_IDS, PREFIX_LENS, PREFIX_OFFSETS, b, K_SLOTS, reach, HAS_IDS=HAS_IDS, HAS_LENS=HAS_LENS,
        HAS_OFFSETS=HAS_OFFSETS, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N)
    pk_base = PK + prompt * stride_pkp + kvh * stride_pkh
    pv_base = PV + prompt * stride_pvp + kvh * stride_pvh
    if not HAS_WINDOW:  # whole blocks of slots: no mask at all
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, pk_base, pv_base, stride_pkn, stride_pvn, slots_lo, slots_free, offs_m, causal_shift,
            PADDING, 0, D, scale_log2, cap_scale, cap_log2, slot_base, window, MASKED=False, CAUSAL=False,
            HAS_PADDING=False, HAS_WINDOW=False, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, pk_base, pv_base, stride_pkn, stride_pvn, slots_free, n_slots, offs_m, causal_shift,
        PADDING, 0, D, scale_log2, cap_scale, cap_log2, slot_base, window, MASKED=True, CAUSAL=False,
        HAS_PADDING=False, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)

    # The row's own keys: unmasked blocks below the diagonal, then the masked band.
    lo, free_end, hi = sequence_key_range(start_m, causal_shift, Lk, reach, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW,
                                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    pad_base = PADDING + b * stride_pb
    if not HAS_WINDOW:
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, free_end, offs_m, causal_shift, pad_base,
            stride_pn, D, scale_log2, cap_scale, cap_log2, 0, window, MASKED=False, CAUSAL=CAUSAL,
            HAS_PADDING=HAS_PADDING, HAS_WINDOW=False, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D,
            DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, free_end, hi, offs_m, causal_shift, pad_base,
        stride_pn, D, scale_log2, cap_scale, cap_log2, 0, window, MASKED=True, CAUSAL=CAUSAL,
        HAS_PADDING=HAS_PADDING, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, EVEN_D=EVEN_D,
        DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)

    if HAS_SINKS:  # one more logit per head in the normaliser, with no value
        sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        rescale = tl.math.exp2(m_i - m_new)
        acc = acc * rescale[:, None]
        l_i = l_i * rescale + tl.math.exp2(sink - m_new)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    out_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


def refuse_varlen(cu_seqlens: Optional[torch.Tensor]) -> None:
    """The kernels have no variable-length rows yet (the backend refuses them first; this guards direct calls)."""
    if cu_seqlens is not None:
        raise NotImplementedError("the Triton kernels have no variable-length rows (cu_seqlens) yet; "
                                  "prefix_attention(backend='torch') has")


def softcap_args(scale: float, softcap: Optional[float]) -> Tuple[float, float]:
    """(scale / cap, cap * log2(e)) for the kernels (ones when there is no cap: never read then)."""
    return (scale / softcap, softcap * LOG2E) if softcap is not None else (1.0, 1.0)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32), so fp32 results match the fp32 contract."""
    return "ieee" if dtype == torch.float32 else "tf32"


def padding_view(mask: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """The bool mask as uint8 without a copy (or a dummy), with its strides."""
    if mask is None:
        return like, 0, 0
    view = mask.view(torch.uint8)
    return view, view.stride(0), view.stride(1)


def usable_prefix(q, prefix_k, prefix_v, prompt_ids, prefix_lens):
    """(prefix_k, prefix_v, prompt_ids, prefix_lens, K) for the kernels.

    An empty bank (P = 0 or K = 0) becomes "no row has a prefix" (K = 0) with q standing in for
    the prefix pointers, so that no empty tensor reaches a kernel.
    """
    if prefix_k.numel() > 0:
        return prefix_k, prefix_v, prompt_ids, prefix_lens, prefix_k.shape[2]
    return q, q, None, None, 0


def usable_keys(q, k, v, key_padding_mask):
    """(k, v, key_padding_mask) for the kernels.

    Prefix-only attention (Lk = 0: no sequence keys, docs/DESIGN.md section 2) gets q standing in for
    the key pointers and no padding mask (a [B, 0] mask says nothing), so that no empty tensor reaches a
    kernel; with Lk = 0 the key loops never run and never read them.
    """
    if k.shape[2] > 0:
        return k, v, key_padding_mask
    return q, q, None


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prompt_ids, prefix_lens, key_padding_mask,
                         causal: bool, scale: float, window: Optional[int] = None, softcap: Optional[float] = None,
                         sinks: Optional[torch.Tensor] = None, prefix_offsets: Optional[torch.Tensor] = None,
                         cu_seqlens: Optional[torch.Tensor] = None):
    """Launches the forward kernel. Returns out [B, Hq, Lq, D] (laid out [B, Lq, Hq, D]) and lse fp32."""
    refuse_varlen(cu_seqlens)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    remember_arch(q.device)
    k, v, key_padding_mask = usable_keys(q, k, v, key_padding_mask)  # Lk is read before: 0 stays 0
    pad, stride_pb, stride_pn = padding_view(key_padding_mask, q)
    prefix_k, prefix_v, prompt_ids, prefix_lens, n_slots = usable_prefix(q, prefix_k, prefix_v, prompt_ids,
                                                                          prefix_lens)
    block_d = head_block(D)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)

    launcher(prefix_attention_fwd_kernel)[grid](
        q, k, v, prefix_k, prefix_v,
        prompt_ids if prompt_ids is not None else q, prefix_lens if prefix_lens is not None else q, pad,
        sinks if sinks is not None else lse, prefix_offsets if prefix_offsets is not None else q, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
        stride_pb, stride_pn,
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Lq, Lk, n_slots, D, Hq // Hkv, scale * LOG2E, *softcap_args(scale, softcap),
        window if window is not None else NO_WINDOW,
        length_bucket(Lq), length_bucket(Lk),
        HAS_IDS=prompt_ids is not None, HAS_LENS=prefix_lens is not None,
        HAS_PADDING=key_padding_mask is not None, CAUSAL=causal,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None,
        HAS_OFFSETS=prefix_offsets is not None,
        BLOCK_D=block_d, EVEN_D=block_d == D, DOT_PRECISION=dot_precision(q.dtype),
    )
    return out, lse
