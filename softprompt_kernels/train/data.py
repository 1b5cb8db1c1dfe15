"""Training data for ``softprompt-kernels train``: JSONL files, tokenised examples, padded batches.

One JSON object per line, every line of one kind (the kind decides the task):

- ``{"text": ...}``: causal language modelling, loss on every token;
- ``{"prompt": ..., "completion": ...}``: causal LM with the loss on the completion only (the
  completion ends with the tokenizer's EOS token where it has one);
- ``{"text": ..., "label": ...}``: sequence classification (an encoder or a decoder with a
  classification head); labels are strings or integers, numbered in sorted order.

A line that is not a JSON object of one of these kinds, or whose kind differs from the first line's,
is an error naming the file and line: nothing is skipped. Blank lines are allowed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

KINDS = {
    frozenset({"text"}): "text",
    frozenset({"prompt", "completion"}): "completion",
    frozenset({"text", "label"}): "classification",
}


class DataError(ValueError):
    """A data file that cannot be used, naming the file and line."""


@dataclass
class Record:
    line: int                      # 1-based line number in its file
    fields: Dict[str, object]


@dataclass
class Dataset:
    path: str
    kind: str                      # "text" | "completion" | "classification"
    records: List[Record]


def read_jsonl(path: str, expected_kind: Optional[str] = None) -> Dataset:
    """Reads and checks a JSONL file; ``expected_kind`` (the training file's) is enforced on eval files."""
    try:
        handle = open(path, encoding="utf-8-sig")  # a byte-order mark at the start is not part of line 1
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    kind, records = expected_kind, []
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            text = line.rstrip("\r\n")  # the line's own characters: an error at its end is on it, not on the next
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({_json_problem(error, text)})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            line_kind = KINDS.get(frozenset(obj))
            if line_kind is None:
                raise DataError(f"{where}: expected the keys {{text}}, {{prompt, completion}} or {{text, label}}, "
                                f"got {sorted(obj)}")
            if kind is not None and line_kind != kind:
                raise DataError(f"{where}: a {line_kind!r} line in a file of {kind!r} lines (keys {sorted(obj)})")
            kind = line_kind
            for key in ("text", "prompt", "completion"):
                if key in obj and not isinstance(obj[key], str):
                    raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            if _invalid_label(obj):
                raise DataError(f"{where}: 'label' must be a string or an integer, got {obj['label']!r}")
            if line_kind == "text" and not obj["text"]:
                raise DataError(f"{where}: 'text' is empty")
            if line_kind == "completion" and not obj["completion"]:
                raise DataError(f"{where}: 'completion' is empty")
            records.append(Record(number, obj))
    if not records:
        raise DataError(f"{path}: no examples")
    return Dataset(path, kind, records)


def _json_problem(error: json.JSONDecodeError, text: str) -> str:
    """Where and why a line is not JSON, in columns of the line (1-based characters)."""
    end = len(text) + 1  # the column right after the line's last character
    if error.msg.startswith("Unterminated string"):
        return f"the line ends at column {end} inside a string that starts at column {error.colno}"
    if error.pos >= len(text):
        return f"the line ends at column {end} before the JSON value is complete: {error.msg}"
    return f"{error.msg} at column {error.colno}"


def _invalid_label(obj: Dict[str, object]) -> bool:
    if "label" not in obj:
        return False
    label = obj["label"]
    return isinstance(label, bool) or not isinstance(label, (str, int))


def label_names(dataset: Dataset) -> List[object]:
    """The classes of a classification set, sorted (integers numerically, strings alphabetically)."""
    labels = {record.fields["label"] for record in dataset.records}
    if len({type(label) for label in labels}) > 1:
        raise DataError(f"{dataset.path}: labels mix strings and integers: {sorted(map(str, labels))}")
    return sorted(labels)


@dataclass
class Example:
    input_ids: List[int]
    labels: object                 # List[int] (-100 where not predicted) or int (the class)
    line: int


@dataclass
class Tokenized:
    examples: List[Example]
    truncated: int                 # examples cut to max_length (reported, not hidden)


def tokenize(dataset: Dataset, tokenizer, max_length: int, labels: Optional[Sequence[object]] = None) -> Tokenized:
    """Token ids and labels per example; ``labels`` is the class list of a classification task."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    index = {label: i for i, label in enumerate(labels)} if labels is not None else None
    examples, truncated = [], 0
    eos = tokenizer.eos_token_id
    for record in dataset.records:
        fields = record.fields
        if dataset.kind == "completion":
            prompt = tokenizer(fields["prompt"])["input_ids"] if fields["prompt"] else []
            completion = tokenizer(fields["completion"], add_special_tokens=False)["input_ids"]
            if eos is not None:
                completion = completion + [eos]
            ids = prompt + completion
            target = [-100] * len(prompt) + completion
        else:
            ids = tokenizer(fields["text"])["input_ids"]
            target = list(ids)
        if len(ids) > max_length:
            ids, target, truncated = ids[:max_length], target[:max_length], truncated + 1
        if dataset.kind == "classification":
            label = fields["label"]
            if label not in index:
                raise DataError(f"{dataset.path}:{record.line}: label {label!r} is not among the training labels "
                                f"{list(index)}")
            target = index[label]
        elif all(t == -100 for t in target):
            raise DataError(f"{dataset.path}:{record.line}: nothing left to predict after truncation to "
                            f"{max_length} tokens (raise --max-length)")
        if not ids:
            raise DataError(f"{dataset.path}:{record.line}: the text tokenizes to no tokens")
        examples.append(Example(ids, target, record.line))
    return Tokenized(examples, truncated)


def collate(examples: Sequence[Example], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` [B, n] and ``labels`` ([B, n] with -100, or [B])."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
        mask[row, :len(example.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples])
    else:
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, :len(example.labels)] = torch.tensor(example.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(count: int, epoch: int, seed: int) -> List[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def batch_at(examples: Sequence[Example], batch_size: int, step: int, seed: int,
             pad_token_id: int) -> Dict[str, torch.Tensor]:
    """The batch of global step ``step`` (epochs of shuffled examples, the last batch of each shorter):
    a function of the step alone, so resuming needs no loader state."""
    per_epoch = -(-len(examples) // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(len(examples), epoch, seed)
    return collate([examples[i] for i in order[index * batch_size:(index + 1) * batch_size]], pad_token_id)


def eval_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int) -> List[Dict[str, torch.Tensor]]:
    return [collate(examples[i:i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def split_off_eval(dataset: Dataset, fraction: float, seed: int) -> Tuple[Dataset, Optional[Dataset]]:
    """Holds out ``fraction`` of the training lines for evaluation (at least one, leaving at least one)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    count = round(len(dataset.records) * fraction)
    if fraction == 0.0 or len(dataset.records) < 2:
        return dataset, None
    count = min(max(count, 1), len(dataset.records) - 1)
    order = epoch_order(len(dataset.records), -1, seed)
    held = set(order[:count])
    train = [r for i, r in enumerate(dataset.records) if i not in held]
    evals = [r for i, r in enumerate(dataset.records) if i in held]
    return (Dataset(dataset.path, dataset.kind, train),
            Dataset(f"{dataset.path} (held-out {count} of {len(dataset.records)})", dataset.kind, evals))
