"""An independent float64 statement of prefix attention, for tests only.

Written query by query from the contract in docs/DESIGN.md section 2 (explicit lists of
visible keys, no masks, no concatenation of the whole batch), so that it shares no
code and no structure with any backend. Gradients come from autograd through it.
"""
import torch


def in_window(query_index, key_index, window):
    return window is None or query_index - key_index < window


def visible_sequence_keys(b, i, len_q, len_k, causal, key_padding_mask, window=None):
    keys = []
    query_index = i + (len_k - len_q)
    for j in range(len_k):
        if key_padding_mask is not None and not bool(key_padding_mask[b, j]):
            continue
        if causal and j > query_index:
            continue
        if not in_window(query_index, j, window):
            continue
        keys.append(j)
    return keys


def visible_prefix_slots(i, len_q, len_k, n_slots, window=None, offset=0):
    """Slot s of a prompt with n_slots valid slots sits at index s - n_slots + offset, right before key `offset`."""
    query_index = i + (len_k - len_q)
    return [s for s in range(n_slots) if in_window(query_index, s - n_slots + offset, window)]


def oracle_prefix_attention(q, k, v, prefix_k, prefix_v, prompt_ids=None, prefix_lens=None, causal=True,
                            key_padding_mask=None, scale=None, window=None, softcap=None, sinks=None,
                            prefix_offsets=None, return_lse=True, cu_seqlens=None):
    """Returns (out [B, Hq, Lq, D], lse [B, Hq, Lq]) in float64.

    With ``cu_seqlens`` [S + 1] (B = 1, Lq = Lk = total): each sequence is the row it would be alone, its own
    prompt (``prompt_ids`` [S]) and prefix offset (``prefix_offsets`` [S]), its queries and keys numbered from 0.
    """
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens]
        outs, lses = [], []
        for s in range(len(bounds) - 1):
            lo, hi = bounds[s], bounds[s + 1]
            out, lse = oracle_prefix_attention(
                q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], prefix_k, prefix_v,
                prompt_ids=None if prompt_ids is None else prompt_ids[s:s + 1], prefix_lens=prefix_lens,
                causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
                prefix_offsets=None if prefix_offsets is None else prefix_offsets[s:s + 1])
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    q, k, v, prefix_k, prefix_v = (t.double() for t in (q, k, v, prefix_k, prefix_v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P, K = prefix_k.shape[0], prefix_k.shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out_rows, lse_rows = [], []
    for b in range(B):
        prompt = 0 if prompt_ids is None else int(prompt_ids[b])
        n_slots = 0
        if prompt >= 0 and P > 0:
            n_slots = K if prefix_lens is None else int(prefix_lens[prompt])
        out_heads, lse_heads = [], []
        for h in range(Hq):
            kv_head = h // group
            out_q, lse_q = [], []
            sink = None if sinks is None else sinks[h].double()
            for i in range(Lq):
                seq = visible_sequence_keys(b, i, Lq, Lk, causal, key_padding_mask, window)
                offset = 0 if prefix_offsets is None else int(prefix_offsets[b])
                slots = visible_prefix_slots(i, Lq, Lk, n_slots, window, offset)
                keys = [prefix_k[prompt, kv_head, s] for s in slots] + [k[b, kv_head, j] for j in seq]
                values = [prefix_v[prompt, kv_head, s] for s in slots] + [v[b, kv_head, j] for j in seq]
                if not keys:
                    out_q.append(q.new_zeros(D) * q[b, h, i])  # keeps the graph: zero gradient
                    lse_q.append(q.new_tensor(float("-inf")) if sink is None else sink * 1.0)
                    continue
                scores = torch.stack(keys) @ q[b, h, i] * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                logits = scores if sink is None else torch.cat([scores, sink[None]])
                lse = torch.logsumexp(logits, dim=0)
                out_q.append(torch.exp(scores - lse) @ torch.stack(values))
                lse_q.append(lse)
            out_heads.append(torch.stack(out_q) if out_q else q.new_zeros(0, D))
            lse_heads.append(torch.stack(lse_q) if lse_q else q.new_zeros(0))
        out_rows.append(torch.stack(out_heads))
        lse_rows.append(torch.stack(lse_heads))
    return torch.stack(out_rows), torch.stack(lse_rows)
