"""The HTTP server: concurrent clients across adapters, bad requests, overload; and the CLI."""
import copy
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("peft")

import softprompt_kernels as sk  # noqa: E402
from hf_models import tiny_model  # noqa: E402
from softprompt_kernels.serving.server import CompletionServer  # noqa: E402
from test_serving_bank import make_adapter  # noqa: E402


def post(url, payload, timeout=60):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def served():
    base = tiny_model("llama")
    bank = sk.PromptBank(copy.deepcopy(base), capacity=2)  # 3 adapters: batches must evict and reload
    for seed, (name, kind, k) in enumerate([("a", "prompt", 4), ("b", "prefix", 3), ("c", "prompt", 6)]):
        bank.add(name, make_adapter(base, kind, k, seed))
    server = CompletionServer(bank, port=0, max_batch=8, max_queue=64, batch_window_s=0.02).start()
    yield server, bank
    server.stop()


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17], [18, 19, 20], [21, 22, 23, 24, 25]]


def test_concurrent_clients_get_their_adapters_tokens(served):
    server, bank = served
    requests = [{"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0}
                for model, prompt in zip(["a", "b", "base", "c", "a", "b"], PROMPTS)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda r: post(server.address, r), requests))
    for request, (status, body) in zip(requests, answers):
        assert status == 200, body
        adapter = None if request["model"] == "base" else request["model"]
        alone = bank.generate(torch.tensor([request["prompt"]]), adapters=[adapter], max_new_tokens=5)[0]
        assert body["choices"][0]["tokens"] == alone
        assert body["usage"]["completion_tokens"] == 5 and body["object"] == "text_completion"


@pytest.mark.parametrize("payload, status, message", [
    (b"{not json", 400, "malformed JSON"),
    ({"model": "nope", "prompt": [1, 2]}, 404, "does not exist"),
    ({"model": "a", "prompt": "text"}, 400, "no tokenizer"),
    ({"model": "a", "prompt": []}, 400, "non-empty list of token ids"),
    ({"model": "a", "prompt": [1, 100000]}, 400, "token ids must lie in"),
    ({"model": "a", "prompt": [1], "max_tokens": 0}, 400, "'max_tokens' must be an integer"),
    ({"model": "a", "prompt": [1], "temperature": -1}, 400, "'temperature' must be a number"),
    ({"model": "a", "prompt": [1], "stream": True}, 400, "not supported"),
    ([1, 2, 3], 400, "must be a JSON object"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, payload, status, message):
    server, _ = served
    got, body = post(server.address, payload)
    assert got == status and message in body["error"]["message"]
    ok, _ = post(server.address, {"model": "a", "prompt": [3, 4], "max_tokens": 2, "temperature": 0})
    assert ok == 200


def test_models_and_health(served):
    server, _ = served
    with urllib.request.urlopen(server.address + "/v1/models", timeout=10) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["base", "a", "b", "c"]
    with urllib.request.urlopen(server.address + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_overload_is_answered_with_503():
    base = tiny_model("llama")
    bank = sk.PromptBank(copy.deepcopy(base))
    server = CompletionServer(bank, port=0, max_batch=1, max_queue=1, batch_window_s=0.0).start()
    try:
        slow = {"model": "base", "prompt": [5, 6, 7], "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: post(server.address, slow, timeout=120), range(8)))
        statuses = [status for status, _ in answers]
        assert 503 in statuses and 200 in statuses
        overloaded = next(body for status, body in answers if status == 503)
        assert "overloaded" in overloaded["error"]["message"]
        assert post(server.address, {"model": "base", "prompt": [1], "max_tokens": 1})[0] == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_cli_serve_on_loopback(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(str(tmp_path / "model"))
    make_adapter(base, "prefix", 3, 0).save_pretrained(str(tmp_path / "adapter"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "softprompt_kernels.cli", "serve", "--model",
                                str(tmp_path / "model"), "--adapter", f"x={tmp_path / 'adapter'}", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "serving" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise AssertionError(process.stderr.read())
        address = line.split(" on ")[1].split(" ")[0]
        assert address.startswith("http://127.0.0.1:")
        status, body = post(address, {"model": "x", "prompt": [4, 5, 6], "max_tokens": 3, "temperature": 0})
        assert status == 200 and len(body["choices"][0]["tokens"]) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
