"""The ``torch`` backend: prefix attention the way PEFT pays for it.

The prefix of each row is gathered (expanded) over the batch, concatenated in front
of the row's keys and values, the kv heads are repeated for grouped-query attention
(as Hugging Face's ``repeat_kv`` does when a mask is given), and one masked SDPA call
does the rest. Autograd keeps the concatenated copies for backward. This is the
baseline of every benchmark and, run in float64 on the CPU, a readable statement of
the math. When the log-sum-exp is asked for, or logits are soft-capped, or there are
attention sinks, an explicit masked softmax is used instead of SDPA (which does none of
these), as Hugging Face's eager attention does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ...common import accumulation_dtype
from ..backends import Backend, register_backend
from .contract import PrefixAttentionInputs


def visibility_mask(inputs: PrefixAttentionInputs) -> torch.Tensor:
    """Boolean mask [B, Lq, K + Lk] (K = 0 for an empty bank): which keys each query sees."""
    B, Lq, Lk, K = inputs.batch, inputs.len_q, inputs.len_k, inputs.prefix_slots
    device = inputs.device
    key_pos = torch.arange(Lk, device=device)
    query_pos = torch.arange(Lq, device=device) + (Lk - Lq)  # bottom-right aligned
    if inputs.causal:
        seq_visible = (key_pos[None, :] <= query_pos[:, None])[None].expand(B, Lq, Lk)
    else:
        seq_visible = torch.ones(B, Lq, Lk, dtype=torch.bool, device=device)
    if inputs.window is not None:
        seq_visible = seq_visible & (query_pos[:, None] - key_pos[None, :] < inputs.window)[None]
    if inputs.key_padding_mask is not None:
        seq_visible = seq_visible & inputs.key_padding_mask[:, None, :]
    if not _has_prefix(inputs):
        return seq_visible
    slots = _prefix_slot_mask(inputs)[:, None, :].expand(B, Lq, K)  # [B, Lq, K]
    if inputs.window is not None:
        # prefix slot s of a prompt of length n sits at position s - n, right before the text (or before the
        # row's key prefix_offsets[b])
        slot_pos = torch.arange(K, device=device)[None, :] - _row_prefix_lens(inputs)[:, None]  # [B, K]
        if inputs.prefix_offsets is not None:
            slot_pos = slot_pos + inputs.prefix_offsets.long()[:, None]
        slots = slots & (query_pos[None, :, None] - slot_pos[:, None, :] < inputs.window)
    return torch.cat([slots, seq_visible], dim=2)


def _has_prefix(inputs: PrefixAttentionInputs) -> bool:
    return inputs.num_prompts > 0 and inputs.prefix_slots > 0


def _row_prompts(inputs: PrefixAttentionInputs) -> torch.Tensor:
    if inputs.prompt_ids is not None:
        return inputs.prompt_ids.long()
    return torch.zeros(inputs.batch, dtype=torch.long, device=inputs.device)


def _row_prefix_lens(inputs: PrefixAttentionInputs) -> torch.Tensor:
    """[B] long: the number of valid slots of each row's prompt (0 for rows without one)."""
    ids = _row_prompts(inputs)
    if inputs.prefix_lens is None:
        lens = torch.full((inputs.batch,), inputs.prefix_slots, dtype=torch.long, device=inputs.device)
    else:
        lens = inputs.prefix_lens.long()[ids.clamp(min=0)]
    return torch.where(ids >= 0, lens, 0)


def _prefix_slot_mask(inputs: PrefixAttentionInputs) -> torch.Tensor:
    """[B, K] bool: slot s of row b's prompt is used."""
    slots = torch.arange(inputs.prefix_slots, device=inputs.device)
    return slots[None, :] < _row_prefix_lens(inputs)[:, None]


def _expanded_prefix(prefix: torch.Tensor, inputs: PrefixAttentionInputs) -> torch.Tensor:
    """The per-row copy PEFT makes: [B, Hkv, K, D]."""
    if inputs.prompt_ids is None:
        return prefix.expand(inputs.batch, -1, -1, -1)
    return prefix.index_select(0, inputs.prompt_ids.long().clamp(min=0))


def concatenated_kv(inputs: PrefixAttentionInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values with each row's prefix in front: [B, Hkv, K + Lk, D] each."""
    if not _has_prefix(inputs):
        return inputs.k, inputs.v
    keys = torch.cat([_expanded_prefix(inputs.prefix_k, inputs), inputs.k], dim=2)
    values = torch.cat([_expanded_prefix(inputs.prefix_v, inputs), inputs.v], dim=2)
    return keys, values


def prefix_attention_torch(
    inputs: PrefixAttentionInputs, return_lse: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (out [B, Hq, Lq, D], lse [B, Hq, Lq] or None).

    ``inputs.dropout_p`` drops attention probabilities (training with attention dropout, as the Hugging Face
    layers do); the fused backends have no dropout, so this path serves it.
    """
    if inputs.cu_seqlens is not None:
        return _sequence_by_sequence(inputs, return_lse)
    dropout_p = inputs.dropout_p
    keys, values = concatenated_kv(inputs)
    group = inputs.heads_q // inputs.heads_kv
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    mask = visibility_mask(inputs)[:, None]  # [B, 1, Lq, K + Lk]
    if return_lse or inputs.softcap is not None or inputs.sinks is not None:
        out, lse = _explicit_softmax_attention(inputs.q, keys, values, mask, inputs.scale, dropout_p, inputs.softcap,
                                               inputs.sinks)
        return out, (lse if return_lse else None)
    # A query that sees nothing gets a dummy all-visible row, then zeros: SDPA would give NaN.
    sees_any = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(inputs.q, keys, values, attn_mask=mask | ~sees_any,
                                         dropout_p=dropout_p, scale=inputs.scale)
    return out.masked_fill(~sees_any, 0.0), None


def _sequence_by_sequence(inputs: PrefixAttentionInputs, return_lse: bool):
    """Variable-length rows (cu_seqlens): each packed sequence is the row it would be alone, its own prompt and
    prefix offset, one after another (the bounds read on the host: this is the reference path)."""
    bounds = inputs.cu_seqlens.tolist()
    outs, lses = [], []
    for s in range(len(bounds) - 1):
        tokens = slice(bounds[s], bounds[s + 1])
        alone = dataclasses.replace(
            inputs, q=inputs.q[:, :, tokens], k=inputs.k[:, :, tokens], v=inputs.v[:, :, tokens], cu_seqlens=None,
            prompt_ids=None if inputs.prompt_ids is None else inputs.prompt_ids[s:s + 1],
            prefix_offsets=None if inputs.prefix_offsets is None else inputs.prefix_offsets[s:s + 1])
        out, lse = prefix_attention_torch(alone, return_lse)
        outs.append(out)
        lses.append(lse)
    if not outs:  # no sequences (and no tokens)
        empty_lse = inputs.q.new_empty(inputs.q.shape[:3], dtype=accumulation_dtype(inputs.dtype))
        return torch.empty_like(inputs.q), (empty_lse if return_lse else None)
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if return_lse else None)


def _explicit_softmax_attention(q, keys, values, mask, scale, dropout_p=0.0, softcap=None, sinks=None):
    acc = accumulation_dtype(q.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).to(acc) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    else:  # one more logit per head in the normaliser, with no value: lse = the sink when nothing is visible
        sink = sinks.to(acc)[None, :, None, None].expand(*scores.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - finite_lse[..., None])
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs.to(q.dtype), values)
    return out, lse


class TorchBackend(Backend):
    op = "prefix_attention"
    name = "torch"
    description = "pure PyTorch: expand + concatenate + SDPA, what PEFT does (baseline and oracle)"

    def run(self, inputs, return_lse):
        return prefix_attention_torch(inputs, return_lse)


register_backend(TorchBackend())
