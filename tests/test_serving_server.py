"""The HTTP server on loopback: bursts, isolation of bad and failing requests, malformed HTTP, slow and idle
clients, streaming, the OpenAI fields, overload, disconnects, metrics; and the CLI's start-up.

No assertion depends on the machine's speed: timeouts only bound how long a test waits for what it asserts,
and the continuous-batching test holds the engine at the long request's first token instead of timing it."""
import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("fastapi")

import softprompt_kernels as sk  # noqa: E402
from hf_models import tiny_model  # noqa: E402
from softprompt_kernels.bench.toy_task import word_tokenizer  # noqa: E402
from softprompt_kernels.serving.server import CompletionServer  # noqa: E402
from test_serving_bank import make_adapter  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def post(address, payload, path="/v1/completions", timeout=60):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(address + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read().decode()
            return response.status, (json.loads(raw) if not raw.startswith("data:") else raw), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def events(raw: str):
    chunks = [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def make_server(model_type="llama", **kwargs):
    base = tiny_model(model_type)
    bank = sk.PromptBank(copy.deepcopy(base), capacity=2)  # 3 adapters: batches must evict and reload
    for seed, (name, kind, k) in enumerate([("a", "prompt", 4), ("b", "prefix", 3), ("c", "prompt", 6)]):
        bank.add(name, make_adapter(base, kind, k, seed))
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    options = dict(port=0, max_batch=8, max_queue=256, eos_token_id=2, body_timeout_s=1.0, idle_timeout_s=1.0)
    options.update(kwargs)
    return CompletionServer(bank, tokenizer, **options).start(), bank


@pytest.fixture(scope="module")
def served():
    server, bank = make_server()
    yield server, bank
    server.stop()


def alone(bank, adapter, prompt, max_tokens):
    return bank.generate(torch.tensor([prompt]), adapters=[adapter], max_new_tokens=max_tokens, eos_token_id=2)[0]


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17], [18, 19, 20], [21, 22, 23, 24, 25]]


def test_answers_under_load_equal_each_request_alone(served):
    """Mixed adapters, staggered arrivals (rows join and leave the running batch): every answer is the
    request's own, as if sent alone."""
    server, bank = served
    requests = [{"model": model, "prompt": prompt, "max_tokens": 3 + 2 * (i % 4), "temperature": 0}
                for i, (model, prompt) in enumerate(zip(["a", "b", "base", "c", "a", "b"] * 4, PROMPTS * 4))]

    def send(i):
        time.sleep(0.01 * (i % 5))
        return post(server.address, requests[i])

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(send, range(len(requests))))
    for request, (status, body, _) in zip(requests, answers):
        assert status == 200, body
        adapter = None if request["model"] == "base" else request["model"]
        assert body["choices"][0]["tokens"] == alone(bank, adapter, request["prompt"], request["max_tokens"])


def test_a_burst_of_120_clients_gets_no_connection_errors(served):
    server, _ = served
    payload = {"model": "a", "prompt": [5, 6], "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(max_workers=120) as pool:
        answers = list(pool.map(lambda _: post(server.address, payload, timeout=120), range(120)))
    assert [status for status, _, _ in answers] == [200] * 120


@pytest.mark.parametrize("payload, field, message", [
    ({"model": "a", "prompt": [1], "seed": 2 ** 64}, "seed", "less than or equal"),
    ({"model": "a", "prompt": [1], "max_tokens": 300}, "max_tokens", "passes the model's 256 positions"),
    ({"model": "a", "prompt": [5] * 70000}, "prompt", "at most 251 prompt tokens"),
    ({"model": "a", "prompt": [1], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "a", "prompt": [1], "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"model": "a", "prompt": [1], "best_of": 3}, "best_of", "not supported"),
    ({"model": "a", "prompt": [1], "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"model": "a", "prompt": [1], "logprobs": 2, "echo": True}, "echo", "not supported"),
    ({"model": "a", "prompt": [1], "suffix": "x"}, "suffix", "not supported"),
    ({"model": "a", "prompt": [1], "frobnicate": 1}, "frobnicate", "not a field"),
    ({"model": "a", "prompt": [1], "stream_options": {"include_usage": True}}, "stream_options", "needs"),
    ({"model": "a", "prompt": []}, "prompt", "at least 1"),
    ({"model": "a", "prompt": [1, 100000]}, "prompt", "token ids must lie in"),
    ({"model": "a", "prompt": [1], "n": 2, "max_tokens": 200, "stop": ["x"] * 5}, "stop", "at most 4"),
    ({"model": "a"}, "prompt", "is required"),
])
def test_bad_requests_get_400_naming_the_field(served, payload, field, message):
    server, _ = served
    status, body, _ = post(server.address, payload)
    assert status == 400 and body["error"]["param"] == field and message in body["error"]["message"], body


def test_poisoned_requests_never_fail_the_requests_beside_them(served):
    server, bank = served
    good = {"model": "b", "prompt": [9, 10, 11], "max_tokens": 6, "temperature": 0}
    poison = [{"model": "a", "prompt": [1], "seed": 2 ** 64}, {"model": "a", "prompt": [1], "max_tokens": 300},
              {"model": "a", "prompt": [5] * 70000}, b'{"model": "a", "prompt": [' + b"1" * 5000 + b"]}",
              b"[" * 100000, {"model": "nope", "prompt": [1]}]
    mixed = [good, *poison, good, good]
    with ThreadPoolExecutor(max_workers=len(mixed)) as pool:
        answers = list(pool.map(lambda p: post(server.address, p), mixed))
    expected = alone(bank, "b", good["prompt"], 6)
    for payload, (status, body, _) in zip(mixed, answers):
        if payload is good:
            assert status == 200 and body["choices"][0]["tokens"] == expected
        else:
            assert 400 <= status < 500, body


def test_an_error_while_running_fails_only_its_row(served, monkeypatch):
    """A forward that raises for one row (injected: any batch holding its poisoned prompt token at prefill,
    or its second generated token at decode) fails that request with 500; the others finish correctly."""
    server, bank = served
    victim = {"model": "c", "prompt": [30, 31, 32], "max_tokens": 8, "temperature": 0}
    victim_tokens = alone(bank, "c", victim["prompt"], 8)
    poison_token = victim_tokens[1]
    others = [{"model": m, "prompt": p, "max_tokens": 6, "temperature": 0}
              for m, p in [("a", [5, 6, 7, 8]), ("b", [9, 10]), ("base", [40, 41])]]
    others = [o for o in others if poison_token not in alone(bank, None if o["model"] == "base" else o["model"],
                                                             o["prompt"], 6) + o["prompt"]]
    assert others
    model = bank.model
    original = model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and bool((ids == poison_token).any()):
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda p: post(server.address, p), [victim, *others]))
    monkeypatch.undo()
    status, body, _ = answers[0]
    assert status == 500 and "injected fault" in body["error"]["message"]
    for payload, (status, body, _) in zip(others, answers[1:]):
        adapter = None if payload["model"] == "base" else payload["model"]
        assert status == 200 and body["choices"][0]["tokens"] == alone(bank, adapter, payload["prompt"], 6)


def raw_http(address, data: bytes, read_timeout=30.0, wait_close=False):
    """(bytes received, whether the server closed the connection); ``read_timeout`` only bounds the wait.

    The request is sent from another thread while this one reads, and a send the server cut short is not an
    error: the answer is read whatever the client is still sending (a 413 to a body still arriving)."""
    host, port = address.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sender = threading.Thread(target=_send_all, args=(sock, data), daemon=True)
        sender.start()
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received, True  # the server closed the connection
                received += chunk
                if not wait_close and b"\r\n\r\n" in received:
                    head, _, rest = received.partition(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")]
                    if length and len(rest) >= length[0]:
                        return received, False
        except socket.timeout:
            return received, False
        finally:
            sender.join(read_timeout)


def _send_all(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the server answered and closed before reading all of it
        pass


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nContent-Length: 9\r\n\r\n{}",
])
def test_malformed_http_is_answered_with_4xx(served, request_bytes):
    server, _ = served
    received, _ = raw_http(server.address, request_bytes)
    assert received.startswith(b"HTTP/1.1 4"), received[:200]


def test_a_chunked_body_is_one_request(served):
    server, bank = served
    body = json.dumps({"model": "a", "prompt": [5, 6], "max_tokens": 2, "temperature": 0}).encode()
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    received, _ = raw_http(server.address, request)
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["choices"][0]["tokens"] == alone(bank, "a", [5, 6], 2)


def test_short_bodies_and_idle_connections_are_closed(served):
    """The server closes them itself (the client would wait for its read timeout, a guard of 30 s)."""
    server, _ = served
    short = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": "
    received, closed = raw_http(server.address, short, wait_close=True)
    assert received.startswith(b"HTTP/1.1 408") and closed
    received, closed = raw_http(server.address, b"", wait_close=True)  # connects, says nothing
    assert closed
    received, closed = raw_http(server.address, b"POST /v1/compl", wait_close=True)
    assert closed  # half a request head
    keep_alive = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    received, closed = raw_http(server.address, keep_alive, wait_close=True)
    assert received.startswith(b"HTTP/1.1 200") and closed


def test_streamed_tokens_equal_the_non_streamed_answer(served):
    server, _ = served
    for path, payload in [("/v1/completions", {"model": "a", "prompt": "the cat sat on", "max_tokens": 6,
                                               "temperature": 0}),
                          ("/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "the dog"}],
                                                    "max_tokens": 5, "temperature": 0})]:
        status, whole, _ = post(server.address, payload, path)
        assert status == 200
        status, raw, headers = post(server.address, {**payload, "stream": True,
                                                     "stream_options": {"include_usage": True}}, path)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        chunks = events(raw)
        tokens = [t for c in chunks for choice in c["choices"] for t in choice["tokens"]]
        assert tokens == whole["choices"][0]["tokens"] and len([c for c in chunks if c["choices"]]) == len(tokens)
        if path == "/v1/completions":
            text = "".join(choice["text"] for c in chunks for choice in c["choices"])
            assert text == whole["choices"][0]["text"]
        else:
            text = "".join(choice["delta"].get("content", "") for c in chunks for choice in c["choices"])
            assert text == whole["choices"][0]["message"]["content"]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["usage"]["completion_tokens"] == len(tokens)


@pytest.mark.parametrize("path, payload", [
    ("/v1/completions", {"model": "a", "prompt": "the cat", "max_tokens": 5, "echo": True}),
    ("/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "the dog"}], "max_tokens": 5}),
])
def test_stream_chunks_follow_their_events_however_late_they_are_read(served, monkeypatch, path, payload):
    """The HTTP side may read a choice's first event after the engine thread has appended later tokens (a busy
    machine): each chunk is built from its own event. Forced here by holding the server's event loop from the
    first event until the request is done."""
    server, _ = served
    submit = server.engine.submit

    def submit_read_late(request):  # the server's event loop
        loop, report = asyncio.get_running_loop(), request.on_event

        def on_event(req, choice, delta):  # the engine thread
            if len(choice.tokens) == 1:  # queued before the first event, so that the loop blocks before reading it
                loop.call_soon_threadsafe(req.done.wait, 60)  # 60 s: a guard, the engine sets it
            report(req, choice, delta)
        request.on_event = on_event
        return submit(request)

    monkeypatch.setattr(server.engine, "submit", submit_read_late)
    status, raw, _ = post(server.address, {**payload, "temperature": 0, "stream": True}, path)
    assert status == 200
    chunks = events(raw)
    assert [len(c["choices"][0]["tokens"]) for c in chunks] == [1] * 5
    first = chunks[0]["choices"][0]
    if path == "/v1/completions":
        assert first["text"].startswith("the cat") and not any(
            c["choices"][0]["text"].startswith("the cat") for c in chunks[1:])
    else:
        assert first["delta"]["role"] == "assistant" and all("role" not in c["choices"][0]["delta"] for c in chunks[1:])


def test_stop_n_logprobs_echo_seed(served):
    server, _ = served
    base = {"model": "a", "prompt": "the cat", "max_tokens": 24, "temperature": 0}
    _, whole, _ = post(server.address, base)
    words = whole["choices"][0]["text"].split()
    assert len(words) >= 2 and words[1] != words[0]
    _, stopped, _ = post(server.address, {**base, "stop": ["zzz", words[1]]})
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop" and words[1] not in choice["text"].split()
    assert len(choice["tokens"]) < len(whole["choices"][0]["tokens"])
    assert whole["choices"][0]["text"].startswith(choice["text"])
    _, echoed, _ = post(server.address, {**base, "echo": True})
    assert echoed["choices"][0]["text"] == "the cat" + whole["choices"][0]["text"]
    _, probs, _ = post(server.address, {**base, "logprobs": 3, "max_tokens": 3})
    entry = probs["choices"][0]["logprobs"]
    assert len(entry["token_logprobs"]) == 3 and all(len(top) == 3 for top in entry["top_logprobs"])
    for logprob, top in zip(entry["token_logprobs"], entry["top_logprobs"]):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the chosen token is the top one
    sampled = {"model": "b", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0.9, "seed": 7, "n": 3}
    _, first, _ = post(server.address, sampled)
    _, second, _ = post(server.address, sampled)
    assert [c["tokens"] for c in first["choices"]] == [c["tokens"] for c in second["choices"]]
    assert len({tuple(c["tokens"]) for c in first["choices"]}) > 1 and first["usage"]["completion_tokens"] == 18


def test_chat_needs_a_chat_template():
    server, _ = make_server()
    server.tokenizer.chat_template = None
    try:
        status, body, _ = post(server.address, {"model": "a", "messages": [{"role": "user", "content": "hi"}]},
                               "/v1/chat/completions")
        assert status == 400 and body["error"]["param"] == "messages"
        status, body, _ = post(server.address, {"model": "a", "messages": [{"role": "robot", "content": "hi"}]},
                               "/v1/chat/completions")
        assert status == 400 and body["error"]["param"].startswith("messages")
    finally:
        server.stop()


def test_overload_is_503_with_retry_after_and_the_server_recovers():
    server, _ = make_server(max_batch=1, max_queue=1)
    try:
        slow = {"model": "base", "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0}
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: post(server.address, slow, timeout=120), range(8)))
        statuses = [status for status, _, _ in answers]
        assert 503 in statuses and 200 in statuses
        status, body, headers = next(a for a in answers if a[0] == 503)
        assert headers.get("retry-after") == "1" and "overloaded" in body["error"]["message"]
        assert post(server.address, {"model": "base", "prompt": [1], "max_tokens": 1})[0] == 200
    finally:
        server.stop()


def test_a_client_that_disconnects_leaves_the_batch(served):
    server, _ = served
    host, port = server.address.rsplit("//", 1)[1].split(":")
    body = json.dumps({"model": "a", "prompt": [5, 6], "max_tokens": 240, "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data:" not in received:
        received += sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 10
    while server.engine.running_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.running_rows == 0


def test_a_short_request_joins_a_running_batch(served, monkeypatch):
    """Continuous batching: a request arriving while a long one runs is answered while the long one still runs.

    The engine thread is held at the long request's first token until the short request is queued, so that
    the long one is running whatever the machine's speed; the assertion is on the long request's token count
    when the short one finished."""
    server, bank = served
    engine = server.engine
    submitted, long_running, short_queued = {}, threading.Event(), threading.Event()
    submit = engine.submit

    def watched_submit(request):
        name = "long" if request.params.max_tokens == 240 else "short"
        submitted[name] = request
        report = request.on_event

        def on_event(req, choice, delta):  # the engine thread
            report(req, choice, delta)
            if name == "long" and len(choice.tokens) == 1:
                long_running.set()
                short_queued.wait(60)  # a guard: released as soon as the short request is queued
            if name == "short" and req.finished:
                submitted["long tokens when short finished"] = len(submitted["long"].choices[0].tokens)
        request.on_event = on_event
        result = submit(request)
        if name == "short":
            short_queued.set()
        return result

    monkeypatch.setattr(engine, "submit", watched_submit)
    long_request = {"model": "a", "prompt": [5, 6], "max_tokens": 240, "temperature": 0}
    with ThreadPoolExecutor(max_workers=1) as pool:
        long_future = pool.submit(post, server.address, long_request)
        assert long_running.wait(60)
        short = post(server.address, {"model": "b", "prompt": [9], "max_tokens": 2, "temperature": 0})
        long_answer = long_future.result()
    assert short[0] == 200 and long_answer[0] == 200
    assert submitted["long tokens when short finished"] < 240 and len(long_answer[1]["choices"][0]["tokens"]) == 240
    assert short[1]["choices"][0]["tokens"] == alone(bank, "b", [9], 2)


def test_models_health_metrics(served):
    server, _ = served
    with urllib.request.urlopen(server.address + "/v1/models", timeout=10) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["base", "a", "b", "c"]
    with urllib.request.urlopen(server.address + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(server.address + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for name in ("softprompt_queue_depth", "softprompt_running_rows", "softprompt_tokens_per_second",
                 "softprompt_time_to_first_token_seconds_bucket", "softprompt_time_per_output_token_seconds_bucket",
                 'softprompt_requests_total{status="200"}'):
        assert name in text
    status, body, _ = post(server.address, {"x": 1}, path="/v1/nothing")
    assert status == 404


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "softprompt_kernels.cli", "serve", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = tiny_model("llama")
    base.save_pretrained(str(root / "model"))
    make_adapter(base, "prefix", 3, 0).save_pretrained(str(root / "adapter"))
    return root


@pytest.mark.slow
def test_cli_refuses_bad_adapters_one_line_each(model_dir):
    result = run_cli("--model", str(model_dir / "model"), "--adapter", f"ok={model_dir / 'adapter'}",
                     "--adapter", f"gone={model_dir / 'missing'}", "--adapter", f"also={model_dir / 'model'}",
                     "--port", "0")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("softprompt-kernels serve:")]
    assert len(lines) == 2 and "'gone'" in lines[0] and "'also'" in lines[1] and "Traceback" not in result.stderr
    result = run_cli("--model", str(model_dir / "model"), "--adapter", f"base={model_dir / 'adapter'}")
    assert result.returncode == 2 and "reserved" in result.stderr
    result = run_cli("--model", str(model_dir / "model"), "--max-queue", "0")
    assert result.returncode == 2 and "--max-queue" in result.stderr


@pytest.mark.slow
def test_cli_serves_warns_off_loopback_and_stops_on_sigterm(model_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "softprompt_kernels.cli", "serve", "--model",
                                str(model_dir / "model"), "--adapter", f"x={model_dir / 'adapter'}", "--port", "0",
                                "--host", "0.0.0.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "serving" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise AssertionError(process.stderr.read())
        port = line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1]
        address = f"http://127.0.0.1:{port}"
        status, body, _ = post(address, {"model": "x", "prompt": [4, 5, 6], "max_tokens": 3, "temperature": 0})
        assert status == 200 and len(body["choices"][0]["tokens"]) == 3
        for _ in range(5):  # clients that vanish mid-stream
            sock = socket.create_connection(("127.0.0.1", int(port)))
            payload = json.dumps({"model": "x", "prompt": [4], "max_tokens": 100, "stream": True}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(payload)).encode()
                         + b"\r\n\r\n" + payload)
            sock.recv(100)
            sock.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        stderr = process.stderr.read()
        assert "reachable from other machines" in stderr and "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_gpt2_positions_are_checked_per_request():
    """GPT-2 has learned positions (n_positions = 256): a request past them is a 400 for that request only."""
    server, bank = make_server("gpt2")
    try:
        good = {"model": "b", "prompt": [9, 10, 11], "max_tokens": 4, "temperature": 0}
        bad = [{"model": "a", "prompt": [5] * 250, "max_tokens": 10}, {"model": "c", "prompt": [5] * 300}]
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda p: post(server.address, p), [good, *bad, good]))
        assert [a[0] for a in answers] == [200, 400, 400, 200]
        assert answers[1][1]["error"]["param"] == "max_tokens" and answers[2][1]["error"]["param"] == "prompt"
        assert answers[0][1]["choices"][0]["tokens"] == alone(bank, "b", good["prompt"], 4)
    finally:
        server.stop()


def test_many_idle_connections_cost_no_threads_and_are_closed(served):
    import threading

    server, _ = served
    host, port = server.address.rsplit("//", 1)[1].split(":")
    before = threading.active_count()
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(300)]
    try:
        time.sleep(0.2)
        assert threading.active_count() <= before + 2
        assert post(server.address, {"model": "a", "prompt": [5], "max_tokens": 1})[0] == 200  # still serving
        deadline = time.monotonic() + 30  # a guard: the idle timer (1 s) closes them long before
        for sock in sockets:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert sock.recv(10) == b""  # closed by the server's idle timer
    finally:
        for sock in sockets:
            sock.close()


def test_a_body_over_the_limit_is_413(served):
    """The 413 is read whatever the client is still sending (the server drains a bounded amount first, and the
    client here reads while it sends); a declared length past what the server drains is answered at once."""
    server, _ = served
    big = json.dumps({"model": "a", "prompt": "the " * 300000}).encode()  # 1.2 MB
    status, body, _ = post(server.address, big)  # urllib: sends the whole body, then reads
    assert status == 413 and "over the limit" in body["error"]["message"]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    received, _ = raw_http(server.address, head + b"Content-Length: %d\r\n\r\n" % len(big) + big)
    assert received.startswith(b"HTTP/1.1 413") and b"over the limit" in received
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n")
    received, _ = raw_http(server.address, chunked)  # no Content-Length to check up front
    assert received.startswith(b"HTTP/1.1 413")
    received, closed = raw_http(server.address, head + b"Content-Length: 1000000000\r\n\r\n{}", wait_close=True)
    assert received.startswith(b"HTTP/1.1 413") and closed
