"""The losses of accelerated forwards, from the text pass's logits and the prompt pass's (docs/DESIGN.md section 3).

PEFT computes its losses over the concatenated ``[prompt; text]`` logits ``[B, k + n, V]``. The shared-prompt
reformulation never builds them: the prompt positions' logits come once from the batch-1 prompt pass (``[1, V]``
for the last position, ``[k, V]`` for CPT's) and the text's from the text pass, and each loss below sums the
same token terms PEFT's does over the two.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def prompt_lm_loss(first_logits, text_logits, labels, num_items_in_batch=None, has_prompt=None):
    """PEFT's loss over [prompt; text]: the last prompt position predicts labels[:, 0] of every row.

    ``first_logits`` is [1, V] (one prompt) or [B, V] (a row's own); rows without a prompt
    (``has_prompt`` False) have no position before their first token, so it is not predicted.
    """
    vocab = text_logits.shape[-1]
    labels, first_labels = _prompt_labels(labels.to(text_logits.device), has_prompt)
    if first_logits is None:  # no row has a prompt
        first = text_logits.new_zeros((), dtype=torch.float32)
    else:
        first = F.cross_entropy(first_logits.float().expand(labels.shape[0], vocab), first_labels,
                                ignore_index=-100, reduction="sum")
    # Position t predicts labels[:, t + 1]; the last position predicts nothing (-100). Shifting the
    # labels instead of slicing the logits keeps the [B * n, V] logits a view (the slice was copied).
    rest = F.cross_entropy(text_logits.float().reshape(-1, vocab), _next_labels(labels).reshape(-1),
                           ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    return (first + rest) / count


def adapter_lm_losses(first_logits, text_logits, labels, num_items_in_batch, has_prompt, prompt_ids, num_adapters):
    """The batch's loss and each adapter's own loss ``[num_adapters]`` (its rows' token losses over its
    rows' token count): what training several adapters in one batch needs, each on its own objective.

    ``first_logits`` None: the model's loss (position t predicts t + 1: prefix tuning); else the prompt
    methods' (the last prompt position predicts labels[:, 0], as in ``prompt_lm_loss``).
    ``prompt_ids [B]``: each row's adapter (-1: the bare model, in no adapter's loss).
    """
    vocab = text_logits.shape[-1]
    labels = labels.to(text_logits.device)
    next_labels = _next_labels(labels)
    token_losses = F.cross_entropy(text_logits.float().reshape(-1, vocab), next_labels.reshape(-1),
                                   ignore_index=-100, reduction="none").view(labels.shape)
    row_losses, row_counts = token_losses.sum(1), (next_labels != -100).sum(1)
    if first_logits is not None:
        labels, first_labels = _prompt_labels(labels, has_prompt)
        first = F.cross_entropy(first_logits.float().expand(labels.shape[0], vocab), first_labels,
                                ignore_index=-100, reduction="none")
        row_losses, row_counts = row_losses + first, row_counts + (first_labels != -100)
    count = num_items_in_batch if num_items_in_batch is not None else row_counts.sum()
    loss = row_losses.sum() / count
    rows = prompt_ids >= 0  # rows of the bare model belong to no adapter
    ids = prompt_ids[rows]
    sums = row_losses.new_zeros(num_adapters).index_add(0, ids, row_losses[rows])
    counts = row_counts.new_zeros(num_adapters).index_add(0, ids, row_counts[rows])
    return loss, sums / counts


def cpt_loss(prompt_logits, text_logits, labels, input_type_mask, config):
    """CPT's loss (PEFT's CPTEmbedding.calculate_loss) without the [B, k + n, V] logits of the concatenation.

    CPT also predicts its context tokens: over [prompt; text] position t predicts label t + 1, where the
    prompt's labels are ``cpt_token_ids`` and only positions whose type (prompt types, then the row's
    ``input_type_mask`` shifted past them) is a positive multiple of 4 count, optionally weighted by an
    exponential decay over a row's label groups, last group first. The prompt's positions (``prompt_logits
    [k, V]``, computed once) are the same for every row; their weights are not.
    """
    batch, length = labels.shape
    k, vocab = prompt_logits.shape
    device = text_logits.device
    labels = labels.to(device)
    if input_type_mask is None:
        input_type_mask = torch.full((batch, length), 4, device=device)
    prefix_labels = torch.tensor(config.cpt_token_ids, device=device).long()[None].expand(batch, k)
    prefix_types = torch.tensor(config.cpt_tokens_type_mask, device=device).long()[None].expand(batch, k)
    input_types = input_type_mask.to(device).long()
    input_types = torch.where(input_types > 0, input_types + prefix_types.max(), input_types)
    types = torch.cat([prefix_types, input_types], dim=1)
    all_labels = torch.cat([prefix_labels, labels], dim=1).masked_fill(~((types > 0) & (types % 4 == 0)), -100)
    next_labels, next_types = all_labels[:, 1:], types[:, 1:]  # [B, k + n - 1]
    ce = functools.partial(F.cross_entropy, ignore_index=-100, reduction="none")
    prompt_part = ce(prompt_logits[:-1].float(), next_labels[0, :k - 1])[None].expand(batch, k - 1)
    first = ce(prompt_logits[-1:].float().expand(batch, vocab), next_labels[:, k - 1])[:, None]
    text = ce(text_logits[:, :-1].float().reshape(-1, vocab), next_labels[:, k:].reshape(-1)).view(batch, length - 1)
    losses = torch.cat([prompt_part, first, text], dim=1)
    valid = next_labels != -100
    weights = valid.float()
    if config.opt_weighted_loss_type == "decay":
        for row in range(batch):
            weights[row] = weights[row] * _group_decay(next_types[row], config.opt_loss_decay_factor)
    return (losses[valid] * weights[valid]).mean()


def token_classification_loss(logits, labels):
    """Mean cross-entropy of per-token logits [B, n, C] against labels [B, n] (-100: ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.to(logits.device).reshape(-1),
                           ignore_index=-100)


def _next_labels(labels):
    """labels[:, t + 1] at position t; the last position predicts nothing (-100)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def _prompt_labels(labels, has_prompt):
    """(labels with the first token unpredicted in rows without a prompt, those first labels [B])."""
    first_labels = labels[:, 0] if has_prompt is None else torch.where(has_prompt, labels[:, 0], -100)
    if has_prompt is not None:
        labels = torch.cat([first_labels[:, None], labels[:, 1:]], dim=1)
    return labels, first_labels


def _group_decay(types, factor: float):
    """CPT's weights of one row's positions: 1 for its last label group, ``factor`` for the one before, ..."""
    groups = types[(types > 0) & (types % 4 == 0)].unique()
    decay, value = torch.ones(types.shape, dtype=torch.float32, device=types.device), 1.0
    for group in torch.flip(groups, [0]):
        decay[types == group] = value
        value *= factor
    return decay
