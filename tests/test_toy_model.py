"""`softprompt-kernels toy-model OUT_DIR`: a small causal LM with a tokenizer, a chat template and data, written
offline, that train, inspect and serve take (the README's CLI examples run on it)."""
import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from softprompt_kernels.bench import toy_task  # noqa: E402
from softprompt_kernels.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy") / "toy"
    assert main(["toy-model", str(directory)]) == 0
    return directory


def test_the_toy_model_loads_with_auto_classes_and_has_a_chat_template(toy, capsys):
    tokenizer = AutoTokenizer.from_pretrained(toy)
    assert tokenizer.chat_template == toy_task.CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"},
                                         {"role": "user", "content": "the dog"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids) == "the cat the dog"
    assert tokenizer.eos_token_id == toy_task.EOS_ID and tokenizer.pad_token_id == toy_task.PAD_ID
    config = AutoConfig.from_pretrained(toy)
    assert config.model_type == "llama" and config.head_dim >= 32  # vLLM's CPU attention needs head dim >= 32
    assert "not a real language model" in (toy / "README.md").read_text()
    for name in ("train", "eval", "cats", "dogs", "completions"):
        lines = (toy / "data" / f"{name}.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line) for line in lines)


def test_the_toy_model_is_briefly_trained_on_the_toy_sentences(toy):
    """Greedy continuations follow the toy task's pattern: the verb and the place follow from the animal."""
    model = AutoModelForCausalLM.from_pretrained(toy).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy)
    for animal, verb, place in (("cat", "sat", "mat"), ("dog", "ran", "log"), ("fish", "swam", "pond")):
        ids = tokenizer(f"the {animal}", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=toy_task.PAD_ID)
        words = tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).split()
        assert words[0] == verb and words[2:4] == ["the", place], words


def test_the_command_says_it_is_a_toy_and_refuses_a_real_directory(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy-model", str(out), "--steps", "0", "--no-data"]) == 0
    assert "NOT a real language model" in capsys.readouterr().out
    assert not (out / "data").exists()
    assert main(["toy-model", str(out), "--steps", "1"]) == 0  # a toy written before is overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert main(["toy-model", str(other)]) == 2
    assert "is not a toy model directory" in capsys.readouterr().err
    assert (other / "config.json").read_text() == "{}"


def test_the_toy_model_is_the_same_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    a = toy_task.toy_model(tmp_path / "a", steps=2, data=False)
    b = toy_task.toy_model(tmp_path / "b", steps=2, data=False)
    for name, tensor in load_file(f"{a}/model.safetensors").items():
        torch.testing.assert_close(load_file(f"{b}/model.safetensors")[name], tensor, rtol=0, atol=0)
