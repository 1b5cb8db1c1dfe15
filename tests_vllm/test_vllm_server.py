"""`softprompt-kernels serve --engine vllm`: vLLM's own OpenAI server (engine in its subprocess, model compiled
as vLLM does by default, prefix caching off) with the plugin: "model": NAME selects an adapter; tokens equal
PEFT's; concurrency, streaming, chat, stop/n/seed/logprobs/penalties; every bad request answered with a 4xx and
the server still serving; adapters registered and removed at run time; a bad adapter stops the start."""
import concurrent.futures
import json
import os
import subprocess

import pytest
from conftest import oracle

from softprompt_kernels.bench.vllm_serving import ServerProcess, free_port, vllm_command
from softprompt_kernels.bench.vllm_serving import http as request

STEPS = 6
SERVED = ["prompt5", "ptune_lstm3", "prefix_proj6", "cartridge3", "multitask4:0", "multitask4:1"]


def serve_command(model_dir, adapters, port, *extra):
    return vllm_command(model_dir, adapters, port, "--max-model-len", "128", "--block-size", "32", *extra)


def start_server(command, port, log) -> ServerProcess:
    """The OpenAI server as users run it: the engine in a subprocess (vLLM's default; conftest turns it off for
    the in-process LLM tests), a small CPU KV cache."""
    return ServerProcess(command, port, log, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                                                  "VLLM_CPU_KVCACHE_SPACE": "1"}).wait_ready()


@pytest.fixture(scope="module")
def server(model_dir, adapters, tmp_path_factory):
    port = free_port()
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    process = start_server(serve_command(model_dir, {n: p for n, (_, p) in adapters.items()}, port,
                                         "--no-enable-prefix-caching"), port, log)
    yield port
    process.stop()


def complete(port, model, prompt, **options):
    status, body = request(port, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": STEPS,
                                                     "temperature": 0, "ignore_eos": True, **options})
    assert status == 200, body
    return json.loads(body)


def token_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_models_lists_every_served_adapter(server, adapters):
    status, body = request(server, "/v1/models")
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert status == 200 and set(SERVED) <= set(ids) and "multitask4" not in ids


def test_completions_equal_peft_and_name_the_adapter(server, base, adapters, tokenizer):
    text = "the cat sat on the mat"
    for name in SERVED + ["base"]:
        out = complete(server, name, text, return_tokens_as_token_ids=True, logprobs=0)
        got = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
        assert got == oracle(base, adapters, None if name == "base" else name, token_ids(tokenizer, text), STEPS), name
        assert out["model"] == (name if name != "base" else out["model"])
        assert out["usage"]["prompt_tokens"] == len(token_ids(tokenizer, text))  # the text's, not the virtual ones


def test_concurrent_mixed_requests_equal_each_alone(server):
    prompts = ["the dog ran", "a bird flew over the tree", "fish swam", "the big red cat", "no", "very good film"]
    jobs = [(name, prompt) for name in SERVED + ["base"] for prompt in prompts[:3]]
    alone = {job: complete(server, *job)["choices"][0]["text"] for job in jobs}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: complete(server, *job)["choices"][0]["text"], jobs)))
    assert together == alone


def test_streaming_equals_non_streaming(server):
    for name in ("prefix_proj6", "multitask4:1"):
        whole = complete(server, name, "the cat sat")["choices"][0]["text"]
        status, body = request(server, "/v1/completions", {"model": name, "prompt": "the cat sat", "stream": True,
                                                           "max_tokens": STEPS, "temperature": 0, "ignore_eos": True})
        chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) == whole
        assert all(c["model"] == name for c in chunks)


def test_chat_stop_n_seed_logprobs_penalties(server):
    status, body = request(server, "/v1/chat/completions", {"model": "prompt5", "max_tokens": STEPS,
                                                            "temperature": 0, "messages": [
                                                                {"role": "user", "content": "the cat sat"}]})
    assert status == 200, body
    chat = json.loads(body)["choices"][0]["message"]["content"]
    assert chat == complete(server, "prompt5", "the cat sat ")["choices"][0]["text"]
    full = complete(server, "cartridge3", "the dog")["choices"][0]["text"]
    stop = full.split()[1]
    cut = complete(server, "cartridge3", "the dog", stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]
    sampled = [complete(server, "prompt5", "the dog", temperature=1.0, seed=5, n=2) for _ in range(2)]
    assert len(sampled[0]["choices"]) == 2
    assert [c["text"] for c in sampled[0]["choices"]] == [c["text"] for c in sampled[1]["choices"]]
    out = complete(server, "multitask4:0", "the dog", logprobs=3, repetition_penalty=1.5, presence_penalty=0.5,
                   frequency_penalty=0.5)
    assert all(len(top) >= 3 for top in out["choices"][0]["logprobs"]["top_logprobs"])  # + the sampled one


def test_every_bad_request_gets_a_4xx_and_the_server_keeps_serving(server):
    good = complete(server, "prompt5", "the cat")["choices"][0]["text"]
    bad = [
        ({"model": "nope", "prompt": "the cat", "max_tokens": 2}, 404, "nope"),
        ({"model": "prompt5", "prompt": "the " * 124, "max_tokens": 2}, 400, "prompt"),
        ({"model": "prefix_proj6", "prompt": "the cat", "max_tokens": 2, "echo": True, "logprobs": 1}, 400,
         "prompt_logprobs"),
        ({"model": "prompt5", "prompt": "the cat", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "prompt5", "prompt": "the cat", "max_tokens": 2, "repetition_penalty": -1}, 400, "repetition"),
    ]
    for payload, status, named in bad:
        got, body = request(server, "/v1/completions", payload)
        assert got == status and named in body, (payload, got, body)
        assert complete(server, "prompt5", "the cat")["choices"][0]["text"] == good
    got, body = request(server, "/v1/completions", raw=b'{"model": "prompt5", "prompt": ')
    assert 400 <= got < 500, body
    assert complete(server, "prompt5", "the cat")["choices"][0]["text"] == good


def test_run_time_registration(server, base, adapters, tmp_path, tokenizer):
    from softprompt_kernels.bench.toy_adapters import make_adapter

    late = make_adapter(base, "ptune_mlp4", seed=42)
    late.save_pretrained(str(tmp_path / "late"))
    status, body = request(server, "/v1/softprompt/adapters", {"name": "late", "path": str(tmp_path / "late")})
    assert status == 200 and json.loads(body)["served"] == ["late"], body
    text = "a bird flew"
    out = complete(server, "late", text, return_tokens_as_token_ids=True, logprobs=0)
    got = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
    assert got == oracle(base, {"late": (late, None)}, "late", token_ids(tokenizer, text), STEPS)
    status, body = request(server, "/v1/softprompt/adapters", {"name": "late", "path": str(tmp_path / "late")})
    assert status == 409 and "late" in body
    status, body = request(server, "/v1/softprompt/adapters", {"name": "ghost", "path": str(tmp_path / "none")})
    assert status == 400 and "ghost" in body and "missing adapter_config.json" in body
    status, body = request(server, "/v1/softprompt/adapters", {"name": "", "path": "x"})
    assert status in (400, 422) and "name" in body
    assert request(server, "/v1/softprompt/adapters/late", method="DELETE")[0] == 200
    assert request(server, "/v1/completions", {"model": "late", "prompt": text, "max_tokens": 2})[0] == 404
    status, body = request(server, "/v1/softprompt/adapters/late", method="DELETE")
    assert status == 404 and "late" in body
    names = [a["name"] for a in json.loads(request(server, "/v1/softprompt/adapters")[1])["adapters"]]
    assert set(SERVED) <= set(names) and "late" not in names


def test_a_bad_adapter_stops_the_start_naming_it(model_dir, adapters, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{}")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = serve_command(model_dir, {"prompt5": adapters["prompt5"][1], "broken": str(tmp_path / "broken")},
                            free_port(), "-O0", "--enforce-eager")
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode != 0
    assert "adapter 'broken'" in done.stdout + done.stderr
    duplicate = subprocess.run(command[:8] + ["--adapter", "a=x", "--adapter", "a=y"], capture_output=True, text=True,
                               timeout=60)
    assert duplicate.returncode == 2 and "given twice" in duplicate.stderr


@pytest.mark.parametrize("family", ["qwen3"])  # mistral passes too (checked by hand; a minute of CI each)
def test_other_families_equal_peft(family, tmp_path):
    """The hooks sit on vLLM's attention layer, not on a model class: Qwen3 (QK-norm before rotary) serves the
    same way (an eager engine)."""
    import torch
    import transformers

    from softprompt_kernels.bench.toy_adapters import save_adapters
    from softprompt_kernels.bench.toy_task import SPECIAL, WORDS, save_model_dir

    config_class = {"qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[family]
    config = config_class(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, vocab_size=len(SPECIAL) + len(WORDS),
                          max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(1)
    model_dir = save_model_dir(transformers.AutoModelForCausalLM.from_config(config), tmp_path / family)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapters = save_adapters(base, tmp_path / "adapters", kinds=("prompt5", "prefix4", "multitask4"))
    port = free_port()
    process = start_server(serve_command(model_dir, {n: p for n, (_, p) in adapters.items()}, port, "-O0",
                                         "--enforce-eager"), port, str(tmp_path / "server.log"))
    try:
        prompt = [5, 9, 13, 17, 21, 25]
        for name in ("prompt5", "prefix4", "multitask4:1", "base"):
            out = complete(port, name, prompt, return_tokens_as_token_ids=True, logprobs=0)
            got = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
            assert got == oracle(base, adapters, None if name == "base" else name, prompt, STEPS), name
    finally:
        process.stop()
