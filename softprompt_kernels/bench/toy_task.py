"""A toy causal-LM task that needs nothing downloaded: a word-level tokenizer, sentences with a learnable
pattern, and a small Llama saved with them as a model directory. The training benchmark's default; the
tests build their models with it too."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

WORDS = ("the a cat dog bird fish sat ran flew swam on under over near mat log tree pond red blue green big "
         "small happy sad good bad great movie film plot story yes no is was very not").split()
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]  # ids 0, 1, 2
PAD_ID, EOS_ID = 0, 2


def word_tokenizer():
    """A whitespace word-level fast tokenizer over SPECIAL + WORDS (45 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def save_model_dir(model, directory) -> str:
    """``model`` (a causal LM whose vocabulary covers the tokenizer's) and the word tokenizer, saved."""
    directory = Path(directory)
    model.config.eos_token_id = EOS_ID
    model.config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
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


def sentences(count: int, seed: int = 0) -> List[str]:
    """'the cat sat on the mat very' ...: the verb and the place follow from the animal."""
    rng = random.Random(seed)
    subjects, verbs, places = ["cat", "dog", "bird", "fish"], ["sat", "ran", "flew", "swam"], ["mat", "log", "tree", "pond"]
    out = []
    for _ in range(count):
        i = rng.randrange(len(subjects))
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
