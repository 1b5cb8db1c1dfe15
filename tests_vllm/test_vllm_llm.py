"""The plugin through vllm.LLM: a mixed batch of every adapter kind plus base rows against PEFT row by row,
prefix caching on and off, penalties and logprobs on adapter rows, run-time registration and every refusal."""
import copy
import math

import pytest
import torch
from conftest import oracle
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from softprompt_kernels import vllm as skv
from softprompt_kernels.adapters import AdapterError

# 11 requests of different lengths over the toy vocabulary (ids 3..40: past the special tokens)
PROMPTS = [[3 + (7 * i + 5 * j) % 38 for j in range(n)] for i, n in enumerate([5, 3, 7, 2, 4, 3, 6, 3, 4, 5, 3])]
STEPS = 8


@pytest.fixture(scope="module")
def llm(model_dir, adapters):
    # one engine in this process for the module (a second in-process engine would tear down the first's
    # distributed state); eager and uncompiled to start in seconds: the server tests run the compiled model
    engine = LLM(model=model_dir, dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
                 compilation_config={"mode": 0}, block_size=32, enable_prefix_caching=True)
    served = skv.add_adapters(engine, {name: path for name, (_, path) in adapters.items()})
    assert "multitask4:0" in served and "multitask4:1" in served and "multitask4" not in served
    yield engine
    for name in list(skv.adapter_names()):
        skv.remove_adapter(engine, name)


def rows_of_every_kind():
    names = ["prompt5", "ptune_mlp4", None, "ptune_lstm3", "prefix4", "prefix_proj6", "cartridge3", "multitask4:1",
             None, "multitask4:0", "prompt5"]
    assert len(names) == len(PROMPTS)
    return names


def greedy(**options):
    return SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, **options)


def test_mixed_batch_equals_peft_row_by_row(llm, base, adapters):
    names = rows_of_every_kind()
    outputs = skv.generate(llm, [{"prompt_token_ids": p} for p in PROMPTS], names, greedy())
    for prompt, name, out in zip(PROMPTS, names, outputs):
        assert list(out.outputs[0].token_ids) == oracle(base, adapters, name, prompt, STEPS), name
        assert list(out.prompt_token_ids) == prompt  # virtual ids never reach the outputs


def test_adapters_change_the_tokens(llm, base, adapters):
    """The comparison above could not pass with the adapters ignored: each changes the base model's tokens."""
    names = [n for n in rows_of_every_kind() if n is not None]
    plain = {tuple(oracle(base, adapters, None, p, STEPS)) for p in PROMPTS[:1]}
    for name in dict.fromkeys(names):
        assert tuple(oracle(base, adapters, name, PROMPTS[0], STEPS)) not in plain, name


def test_prefix_caching_on_and_off_give_the_same_tokens(llm, base, adapters):
    """Blocks of virtual tokens are cached and shared like any others (hashed by their ids); a second pass
    hits them and gives the same tokens as a pass that reads no cache and as PEFT. (The server tests run an
    engine started with prefix caching off against PEFT too.)"""
    long_prompts = [[3 + (i * 7 + j) % 38 for j in range(70)] for i in range(4)]  # beyond two KV blocks
    names = ["prompt5", "prefix4", "multitask4:1", None]
    batch = [{"prompt_token_ids": p} for p in long_prompts]
    first = skv.generate(llm, batch, names, greedy())
    second = skv.generate(llm, batch, names, greedy())
    assert all((out.num_cached_tokens or 0) >= 64 for out in second), "the second pass should hit the prefix cache"
    uncached = skv.generate(llm, batch, names, greedy(skip_reading_prefix_cache=True))
    tokens = [[list(o.outputs[0].token_ids) for o in run] for run in (first, second, uncached)]
    assert tokens[0] == tokens[1] == tokens[2]
    for prompt, name, got in zip(long_prompts, names, tokens[0]):
        assert got == oracle(base, adapters, name, prompt, STEPS), name


def test_penalties_and_logprobs_on_adapter_rows(llm, base, adapters):
    names = ["prompt5", "prefix4", None, "multitask4:0"]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[4]]
    outputs = skv.generate(llm, [{"prompt_token_ids": p} for p in prompts], names,
                           greedy(repetition_penalty=1.8, logprobs=3))
    for prompt, name, out in zip(prompts, names, outputs):
        expected = oracle(base, adapters, name, prompt, STEPS, repetition_penalty=1.8)
        assert list(out.outputs[0].token_ids) == expected, name
        assert all(len(step) >= 3 and max(step) < base.config.vocab_size for step in out.outputs[0].logprobs)
    # logprobs of an adapter row are PEFT's log-softmax (no penalty: vLLM reports the raw distribution)
    out = skv.generate(llm, [{"prompt_token_ids": PROMPTS[0]}], ["prefix4"], greedy(logprobs=1))[0]
    peft_model = adapters["prefix4"][0]
    ids = torch.tensor([PROMPTS[0] + list(out.outputs[0].token_ids[:1])])
    with torch.no_grad():
        logp = torch.log_softmax(peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], -1)
    first = out.outputs[0].token_ids[0]
    assert math.isclose(out.outputs[0].logprobs[0][first].logprob, logp[len(PROMPTS[0]) - 1, first].item(),
                        rel_tol=1e-4, abs_tol=1e-5)
    for penalty in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.0}):
        outs = skv.generate(llm, [{"prompt_token_ids": p} for p in prompts], names, greedy(**penalty))
        assert all(len(o.outputs[0].token_ids) == STEPS for o in outs)


def test_seeded_sampling_and_n(llm):
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=2, ignore_eos=True)
    a = skv.generate(llm, [{"prompt_token_ids": PROMPTS[0]}] * 2, ["prompt5", "prefix4"], params)
    b = skv.generate(llm, [{"prompt_token_ids": PROMPTS[0]}] * 2, ["prompt5", "prefix4"], params)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert all(len(o.outputs) == 2 for o in a)


def test_run_time_registration_and_removal(llm, base, adapters, tmp_path):
    from softprompt_kernels.bench.toy_adapters import make_adapter

    late = make_adapter(base, "prefix4", seed=99)
    late.save_pretrained(str(tmp_path / "late"))
    assert skv.add_adapters(llm, {"late": str(tmp_path / "late")}) == ["late"]
    out = skv.generate(llm, [{"prompt_token_ids": PROMPTS[3]}], ["late"], greedy())[0]
    expected = oracle(base, {"late": (late, None)}, "late", PROMPTS[3], STEPS)
    assert list(out.outputs[0].token_ids) == expected
    skv.remove_adapter(llm, "late")
    with pytest.raises(KeyError, match="unknown adapter 'late'"):
        skv.generate(llm, [{"prompt_token_ids": PROMPTS[3]}], ["late"], greedy())
    # the name can be registered again, with other weights and fresh virtual ids (no stale prefix-cache blocks)
    other = make_adapter(base, "prefix4", seed=100)
    other.save_pretrained(str(tmp_path / "late2"))
    skv.add_adapters(llm, {"late": str(tmp_path / "late2")})
    out = skv.generate(llm, [{"prompt_token_ids": PROMPTS[3]}], ["late"], greedy())[0]
    assert list(out.outputs[0].token_ids) == oracle(base, {"late": (other, None)}, "late", PROMPTS[3], STEPS)
    skv.remove_adapter(llm, "late")


def _saved(model, path):
    model.save_pretrained(str(path))
    return str(path)


def test_refusals_name_the_adapter_and_the_reason(llm, base, adapters, tmp_path, model_dir):
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig

    def other_model(**changes):
        config = LlamaConfig(**{**base.config.to_dict(), **changes})
        return AutoModelForCausalLM.from_config(config)

    def prefix_for(model):
        return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))

    def prompt_for(model):
        return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))

    cases = {
        "hidden": (prompt_for(other_model(hidden_size=64, head_dim=16)), "hidden_size=128"),
        "layers": (prefix_for(other_model(num_hidden_layers=3)), "num_layers = 3; this model has 2"),
        "kvheads": (prefix_for(other_model(num_key_value_heads=4)), "kv heads\\) = 4; this model has 2"),
        "headdim": (prefix_for(other_model(head_dim=16)), "head dim = 16; this model has 32"),
        "adaption": (peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1)), "ADAPTION_PROMPT cannot be served"),
    }
    before = skv.adapter_names()
    for name, (model, reason) in cases.items():
        with pytest.raises(AdapterError, match=f"adapter '{name}' .*{reason}"):
            skv.add_adapters(llm, {name: _saved(model, tmp_path / name)})
    with pytest.raises(AdapterError, match="adapter 'missing' .*missing adapter_config.json"):
        skv.add_adapters(llm, {"missing": str(tmp_path / "nothing")})
    corrupt = _saved(adapters["prefix4"][0], tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="adapter 'corrupt' .*corrupt adapter_model.safetensors"):
        skv.add_adapters(llm, {"corrupt": corrupt})
    with pytest.raises(AdapterError, match="'prompt5' is already registered"):
        skv.add_adapters(llm, {"prompt5": adapters["prefix4"][1]})
    for reserved in ("base", model_dir, "two words"):
        with pytest.raises(AdapterError, match="reserved|without spaces"):
            skv.add_adapters(llm, {reserved: adapters["prefix4"][1]})
    assert skv.adapter_names() == before  # nothing half-registered
    # requests: an unknown adapter, an empty prompt, a prompt too long with the virtual tokens, prompt logprobs
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        skv.generate(llm, [{"prompt_token_ids": [3]}], ["nope"], greedy())
    with pytest.raises(VLLMValidationError, match="takes 5 positions: the prompt.s 125 tokens"):
        skv.generate(llm, [{"prompt_token_ids": [3] * 125}], ["prompt5"], SamplingParams(max_tokens=1))
    with pytest.raises(VLLMValidationError, match="prompt_logprobs are not available"):
        skv.generate(llm, [{"prompt_token_ids": [3, 4]}], ["prompt5"], SamplingParams(max_tokens=1, prompt_logprobs=1))
    # and the engine still serves every kind afterwards
    test_mixed_batch_equals_peft_row_by_row(llm, base, adapters)
