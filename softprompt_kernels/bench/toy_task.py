"""A toy causal-LM task that needs nothing downloaded: a word-level tokenizer, sentences with a learnable
pattern, and a small Llama saved with them as a model directory. The training benchmark's default; the
tests build their models with it too.

``softprompt-kernels toy-model OUT_DIR`` (:func:`toy_model`) writes such a model, briefly trained on the
sentences, with a chat template and JSONL files of the task: a toy to try the commands on (``train``,
``inspect``, ``serve``), not a real language model.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import List, Optional, Sequence

WORDS = ("the a cat dog bird fish sat ran flew swam on under over near mat log tree pond red blue green big "
         "small happy sad good bad great movie film plot story yes no is was very not").split()
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]  # ids 0, 1, 2
PAD_ID, EOS_ID = 0, 2
# The toy model's chat template: the messages' contents, one after another (the vocabulary has no role words).
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
ANIMALS = ("cat", "dog", "bird", "fish")


def word_tokenizer():
    """A whitespace word-level fast tokenizer over SPECIAL + WORDS (41 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def save_model_dir(model, directory, tokenizer=None) -> str:
    """``model`` (a causal LM whose vocabulary covers the tokenizer's) and ``tokenizer`` (default: the word
    tokenizer), saved."""
    directory = Path(directory)
    model.config.eos_token_id = EOS_ID
    model.config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(directory)
    (tokenizer or word_tokenizer()).save_pretrained(directory)
    return str(directory)


def llama_dir(directory, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              positions: int = 256, seed: int = 0) -> str:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=hidden // heads, vocab_size=len(SPECIAL) + len(WORDS),
                                      max_position_embeddings=positions, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return save_model_dir(model, directory)


def sentences(count: int, seed: int = 0, animals: Optional[Sequence[str]] = None) -> List[str]:
    """'the cat sat on the mat very' ...: the verb and the place follow from the animal (one of ``animals``,
    default all four)."""
    rng = random.Random(seed)
    subjects, verbs, places = list(ANIMALS), ["sat", "ran", "flew", "swam"], ["mat", "log", "tree", "pond"]
    allowed = [subjects.index(a) for a in (animals or ANIMALS)]
    out = []
    for _ in range(count):
        i = rng.choice(allowed) if animals else rng.randrange(len(subjects))
        out.append(f"the {subjects[i]} {verbs[i]} {rng.choice(['on', 'under', 'near'])} the {places[i]}"
                   + " very" * rng.randint(0, 3))
    return out


def write_jsonl(path, rows) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_data(path, count: int = 24, seed: int = 0, per_example: int = 1) -> str:
    """``count`` lines of ``per_example`` sentences each (about 9 tokens a sentence)."""
    flat = sentences(count * per_example, seed)
    return write_jsonl(path, [{"text": " ".join(flat[i * per_example:(i + 1) * per_example])} for i in range(count)])


def completion_data(path, count: int = 24, seed: int = 0) -> str:
    rows = []
    for s in sentences(count, seed):
        words = s.split()
        rows.append({"prompt": " ".join(words[:2]), "completion": " ".join(words[2:])})
    return write_jsonl(path, rows)


def classification_data(path, count: int = 24, seed: int = 0) -> str:
    rng = random.Random(seed)
    good, bad = ["good", "great", "happy"], ["bad", "sad", "not good"]
    rows = []
    for i in range(count):
        label = "positive" if i % 2 == 0 else "negative"
        rows.append({"text": f"the movie was {rng.choice(good if label == 'positive' else bad)}", "label": label})
    return write_jsonl(path, rows)


# --- softprompt-kernels toy-model

MARKER = "README.md"
CARD = """# softprompt-kernels toy model

A tiny Llama ({hidden} hidden, {layers} layers, {heads} heads of dim {head_dim}, {positions} positions) with a
word-level tokenizer of {vocab} tokens, written by `softprompt-kernels toy-model` and trained for {steps} steps on
the toy sentences of `softprompt_kernels/bench/toy_task.py` ("the cat sat on the mat", ...). It is a toy for
trying the commands (`train`, `inspect`, `serve`), not a real language model: it knows a few words and one
pattern.

The chat template joins the messages' contents with spaces (the vocabulary has no role words). `data/` holds
JSONL files of the task: `train.jsonl` and `eval.jsonl` ({{"text"}} lines about every animal), `cats.jsonl` and
`dogs.jsonl` (sentences about one animal: a prompt trained on them can steer the model to it),
`completions.jsonl` ({{"prompt", "completion"}} lines).
"""


def _train_briefly(model, tokenizer, steps: int, seed: int) -> List[float]:
    """A few AdamW steps of next-word prediction on the toy sentences; returns the losses."""
    import torch

    texts = sentences(max(64, 32 * steps), seed=seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for step in range(steps):
        rows = [tokenizer(t)["input_ids"] + [EOS_ID] for t in texts[32 * step:32 * (step + 1)]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def toy_model(directory, steps: int = 100, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, positions: int = 256, data: bool = True) -> str:
    """Writes the toy causal LM to ``directory``: a Llama (head dim ``hidden // heads``: 32 by default, what
    vLLM's CPU attention needs at least), trained for ``steps`` steps on the toy sentences (0: untrained),
    the word tokenizer with :data:`CHAT_TEMPLATE`, a model card, and with ``data`` the task's JSONL files
    under ``directory/data``. Deterministic for a seed. Refuses a non-empty directory that is not a toy model
    written before (it is overwritten). Returns the directory."""
    import torch
    import transformers

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not _is_toy(directory))):
        raise FileExistsError(f"{directory} exists and is not a toy model directory: choose a new or empty one")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=hidden // heads, vocab_size=len(SPECIAL) + len(WORDS),
                                      max_position_embeddings=positions, attention_dropout=0.0,
                                      pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    # Matrices of 128 columns: one thread is as fast as several on an idle machine and many times faster on a
    # busy one (100 steps: 6 s on one thread, 100 s on two with the cores shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_briefly(model, tokenizer, steps, seed)
    finally:
        torch.set_num_threads(threads)
    directory.mkdir(parents=True, exist_ok=True)
    save_model_dir(model, directory, tokenizer)
    (directory / MARKER).write_text(CARD.format(hidden=hidden, layers=layers, heads=heads, head_dim=hidden // heads,
                                                vocab=config.vocab_size, positions=positions, steps=steps))
    if data:
        root = directory / "data"
        root.mkdir(exist_ok=True)
        text_data(root / "train.jsonl", 96, seed=seed + 10)
        text_data(root / "eval.jsonl", 16, seed=seed + 11)
        write_jsonl(root / "cats.jsonl", [{"text": t} for t in sentences(48, seed + 12, animals=["cat"])])
        write_jsonl(root / "dogs.jsonl", [{"text": t} for t in sentences(48, seed + 13, animals=["dog"])])
        completion_data(root / "completions.jsonl", 48, seed=seed + 14)
    return str(directory)


def _is_toy(directory: Path) -> bool:
    card = directory / MARKER
    return card.is_file() and card.read_text(errors="replace").startswith("# softprompt-kernels toy model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_format import HelpFormatter

    parser.formatter_class = HelpFormatter
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="directory to write (new or empty, or a toy model written before: overwritten)")
    parser.add_argument("--steps", type=int, default=100,
                        help="training steps on the toy sentences (a few seconds; 0: untrained, random weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the training and the data")
    parser.add_argument("--no-data", action="store_false", dest="data",
                        help="do not write the task's JSONL files under OUT_DIR/data (written by default)")


def run_from_args(args: argparse.Namespace) -> int:
    import time

    start = time.perf_counter()
    try:
        path = toy_model(args.out_dir, steps=args.steps, seed=args.seed, data=args.data)
    except (FileExistsError, ValueError) as error:
        print(f"softprompt-kernels toy-model: {error}", file=sys.stderr)
        return 2
    print(f"wrote a toy model (NOT a real language model: {len(SPECIAL) + len(WORDS)} tokens, trained "
          f"{args.steps} steps) to {path} in {time.perf_counter() - start:.1f} s"
          + (f"; its data: {Path(path) / 'data'}/*.jsonl" if args.data else ""))
    return 0
