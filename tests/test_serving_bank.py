"""PromptBank: mixed-adapter batches give exactly each adapter's own greedy tokens."""
import copy

import pytest
import torch

pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402

ADAPTERS = {"p5": ("prompt", 5), "p3": ("prompt", 3), "x4": ("prefix", 4), "x6": ("prefix", 6)}


def make_adapter(base, kind, k, seed):
    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=k)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def greedy_loop(forward, ids, mask, steps):
    """The definition: recompute the whole sequence with the forward at every step."""
    new = []
    for _ in range(steps):
        with torch.no_grad():
            token = forward(ids, mask)[:, -1].argmax(-1)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(new, 1)


@pytest.fixture(scope="module")
def setup():
    base = tiny_model("llama", dtype=torch.float64)
    peft_models = {name: make_adapter(base, kind, k, seed) for seed, (name, (kind, k)) in enumerate(ADAPTERS.items())}
    return base, peft_models


def test_mixed_batch_equals_each_adapter_alone(setup):
    base, peft_models = setup
    bank = sk.PromptBank(copy.deepcopy(base), capacity=8)
    for name, model in peft_models.items():
        bank.add(name, model)
    ids, mask = padded_batch(B=6, n=8, seed=9, left=True)
    rows = ["p5", "x4", None, "p3", "x6", "p5"]
    steps = 6
    new = bank.generate(ids, mask, adapters=rows, max_new_tokens=steps)
    for row, name in enumerate(rows):
        alone = ids[row][mask[row].bool()][None]  # the request by itself, without the batch's padding
        ones = torch.ones_like(alone)
        model = base if name is None else peft_models[name]
        expected = greedy_loop(lambda i, m: model(input_ids=i, attention_mask=m).logits, alone, ones, steps)
        assert new[row] == expected[0].tolist(), f"row {row} ({name})"


def test_lru_eviction_and_reload_give_identical_outputs(setup):
    base, peft_models = setup
    ids, mask = padded_batch(B=4, n=7, seed=3)
    rows = ["p5", "x4", "p3", "x6"]
    big = sk.PromptBank(copy.deepcopy(base), capacity=8)
    small = sk.PromptBank(copy.deepcopy(base), capacity=2)
    for name, model in peft_models.items():
        big.add(name, model)
        small.add(name, model)
    assert len(small.resident()) == 2 and len(small) == 4
    expected = big.generate(ids, mask, adapters=rows, max_new_tokens=4)
    got = []
    for row, name in enumerate(rows):  # two at a time fit: each batch evicts and reloads
        got += small.generate(ids[row:row + 1], mask[row:row + 1], adapters=[name], max_new_tokens=4)
    assert got == expected
    assert small.resident()[-1] == "x6"


def test_registration_from_directory_equals_live_model(setup, tmp_path):
    base, peft_models = setup
    live, from_disk = sk.PromptBank(copy.deepcopy(base)), sk.PromptBank(copy.deepcopy(base))
    for name, model in peft_models.items():
        model.save_pretrained(str(tmp_path / name))
        live.add(name, model)
        from_disk.add(name, str(tmp_path / name))
    ids, mask = padded_batch(B=4, n=6, seed=5)
    rows = list(ADAPTERS)
    assert live.generate(ids, mask, adapters=rows, max_new_tokens=5) == \
        from_disk.generate(ids, mask, adapters=rows, max_new_tokens=5)


def test_sampling_is_seeded_and_eos_stops_rows(setup):
    base, peft_models = setup
    bank = sk.PromptBank(copy.deepcopy(base))
    bank.add("p5", peft_models["p5"])
    ids, mask = padded_batch(B=3, n=6, seed=1)
    first = bank.generate(ids, mask, adapters=["p5", None, "p5"], max_new_tokens=6, do_sample=True,
                          temperature=0.9, top_p=0.8, seed=123)
    again = bank.generate(ids, mask, adapters=["p5", None, "p5"], max_new_tokens=6, do_sample=True,
                          temperature=0.9, top_p=0.8, seed=123)
    assert first == again
    greedy = bank.generate(ids, mask, adapters=["p5", None, "p5"], max_new_tokens=6)
    eos = greedy[0][2]
    stopped = bank.generate(ids, mask, adapters=["p5", None, "p5"], max_new_tokens=6, eos_token_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    limited = bank.generate(ids, mask, adapters=["p5", None, "p5"], max_new_tokens=[1, 3, 2])
    assert [len(t) for t in limited] == [1, 3, 2]


def test_clear_errors(setup, tmp_path):
    base, peft_models = setup
    bank = sk.PromptBank(copy.deepcopy(base))
    bank.add("p5", peft_models["p5"])
    with pytest.raises(sk.AdapterError, match="already in the bank"):
        bank.add("p5", peft_models["p5"])
    other = tiny_model("llama", dtype=torch.float64, hidden_size=32, head_dim=8)
    wrong = make_adapter(other, "prompt", 4, 0)
    with pytest.raises(sk.AdapterError, match="hidden_size=64"):
        bank.add("wrong", wrong)
    wrong_prefix = make_adapter(tiny_model("llama", dtype=torch.float64, num_hidden_layers=3), "prefix", 4, 0)
    with pytest.raises(sk.AdapterError, match="num_layers = 3; this model has 2"):
        bank.add("wrong-prefix", wrong_prefix)
    with pytest.raises(sk.AdapterError, match="missing adapter_config.json"):
        bank.add("missing", str(tmp_path / "nothing"))
    peft_models["x4"].save_pretrained(str(tmp_path / "corrupt"))
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(sk.AdapterError, match="corrupt adapter_model.safetensors"):
        bank.add("corrupt", str(tmp_path / "corrupt"))
    with pytest.raises(KeyError, match="unknown adapters"):
        bank.generate(*padded_batch(B=1), adapters=["nope"])
    bank.remove("p5")
    assert "p5" not in bank


def assert_mixed_batch_equals_each_alone(base, steps):
    """Four adapters and the bare model in one left-padded batch: each row gets a greedy loop over PEFT's forward
    for its adapter on the row alone."""
    models = {name: make_adapter(base, kind, k, seed) for seed, (name, (kind, k)) in enumerate(ADAPTERS.items())}
    bank = sk.PromptBank(copy.deepcopy(base), capacity=4)
    for name, model in models.items():
        bank.add(name, model)
    ids, mask = padded_batch(B=5, n=7, seed=4, left=True)
    rows = ["x6", "p3", None, "x4", "p5"]
    new = bank.generate(ids, mask, adapters=rows, max_new_tokens=steps)
    for row, name in enumerate(rows):
        alone = ids[row][mask[row].bool()][None]
        model = base if name is None else models[name]
        expected = greedy_loop(lambda i, m: model(input_ids=i, attention_mask=m).logits, alone,
                               torch.ones_like(alone), steps)
        assert new[row] == expected[0].tolist(), f"row {row} ({name})"


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "qwen3"])
def test_mixed_batch_other_families(model_type):
    base = tiny_model(model_type, dtype=torch.float64)
    assert_mixed_batch_equals_each_alone(base, steps=4)


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "gpt_oss", "gemma2", "cohere2"])
def test_mixed_batch_modern_families(model_type):
    """Sliding windows shorter than prefix + text, soft-capping and sinks, served from the bank: each row gets
    the tokens of a greedy loop over PEFT's forward for its adapter alone."""
    from hf_families import tiny_causal_lm

    base = tiny_causal_lm(model_type)
    if model_type != "gpt_oss":  # its expert matmuls take no float64
        base = base.double()
    assert_mixed_batch_equals_each_alone(base, steps=5)


def test_multitask_adapter_is_served_per_task(tmp_path):
    """A MULTITASK_PROMPT_TUNING directory becomes one served adapter per task, `name:task`, each giving PEFT's
    tokens for that task (from the saved shared prompt and task factors, not from a live model)."""
    from peft import MultitaskPromptTuningConfig

    base = tiny_model("llama", dtype=torch.float64)
    model = get_peft_model(copy.deepcopy(base), MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.7, generator=torch.Generator().manual_seed(p.numel()))
    model.eval().save_pretrained(str(tmp_path / "mt"))
    bank = sk.PromptBank(copy.deepcopy(base))
    assert bank.add("mt", str(tmp_path / "mt")) == ["mt:0", "mt:1", "mt:2"]
    assert bank.add("live", model) == ["live:0", "live:1", "live:2"]
    ids, mask = padded_batch(B=4, n=6, seed=3, left=True)
    rows, steps = ["mt:2", "mt:0", None, "live:1"], 4
    new = bank.generate(ids, mask, adapters=rows, max_new_tokens=steps)
    for row, name in enumerate(rows):
        alone = ids[row][mask[row].bool()][None]
        if name is None:
            forward = lambda i, m: base(input_ids=i, attention_mask=m).logits  # noqa: E731
        else:
            task = torch.tensor([int(name.split(":")[1])])
            forward = lambda i, m: model(input_ids=i, attention_mask=m, task_ids=task).logits  # noqa: E731
        assert new[row] == greedy_loop(forward, alone, torch.ones_like(alone), steps)[0].tolist(), name
    with pytest.raises(KeyError, match="unknown adapters"):
        bank.generate(ids[:1], mask[:1], adapters=["mt"], max_new_tokens=1)


def test_unservable_methods_are_refused_by_name():
    from peft import AdaptionPromptConfig

    base = tiny_model("llama", dtype=torch.float64)
    model = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3,
                                                                     adapter_layers=1))
    with pytest.raises(sk.AdapterError, match="ADAPTION_PROMPT cannot be served: adaption prompts add a gated"):
        sk.PromptBank(copy.deepcopy(base)).add("ap", model)
