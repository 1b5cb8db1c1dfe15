"""Model directories and JSONL data for the train/inspect tests (the toy task of the training benchmark)."""
from pathlib import Path

from hf_models import tiny_model
from softprompt_kernels.bench.toy_task import (classification_data, completion_data, save_model_dir,  # noqa: F401
                                               text_data, word_tokenizer, write_jsonl)


def tiny_model_dir(root, model_type="llama", seed=0) -> str:
    """A tiny model of the test matrix (vocabulary 97, 256 positions) with the word tokenizer; pad 0, eos 2."""
    return save_model_dir(tiny_model(model_type, seed=seed), Path(root) / f"tiny-{model_type}")
