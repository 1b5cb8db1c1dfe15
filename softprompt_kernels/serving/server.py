"""An OpenAI-style completions server over a ``PromptBank``, batching concurrent requests across adapters.

    POST /v1/completions  {"model": "<adapter name>" | "base", "prompt": [token ids] | "text",
                           "max_tokens": 16, "temperature": 0, "top_p": 1, "seed": null}
    GET  /v1/models       the adapters served
    GET  /health

Requests wait in a bounded queue; one worker takes everything that arrives within a short window (up to
``max_batch`` rows, any mix of adapters) and runs it as one batch. A full queue is answered at once with
503 and a Retry-After; malformed requests get 400, unknown adapters 404; nothing a client sends stops the
server. It binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import torch

from .generate import generate

BASE_MODEL_NAMES = ("base", "")
MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class _Job:
    adapter: Optional[str]
    tokens: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[List[int]] = None
    error: Optional[str] = None


class CompletionServer:
    def __init__(self, bank, tokenizer=None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
                 max_queue: int = 64, batch_window_s: float = 0.005, max_tokens_limit: int = 1024,
                 eos_token_id: Optional[int] = None, pad_token_id: int = 0, request_timeout_s: float = 600.0):
        self.bank, self.tokenizer = bank, tokenizer
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        self.max_tokens_limit, self.request_timeout_s = max_tokens_limit, request_timeout_s
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self._queue: "queue.Queue[_Job]" = queue.Queue(maxsize=max_queue)
        self._running = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._threads: List[threading.Thread] = []

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "CompletionServer":
        self._running.set()
        self._threads = [threading.Thread(target=self._httpd.serve_forever, daemon=True),
                         threading.Thread(target=self._batch_loop, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._running.clear()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def serve_forever(self) -> None:
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.stop()

    # --- requests

    def parse(self, body: dict) -> _Job:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model", "base")
        if not isinstance(model, str):
            raise RequestError(400, "'model' must be a string: an adapter name, or 'base'")
        adapter = None if model in BASE_MODEL_NAMES else model
        if adapter is not None and adapter not in self.bank:
            raise RequestError(404, f"the model (adapter) {model!r} does not exist; served: "
                                    f"{['base', *self.bank.names()]}", "model_not_found")
        tokens = self._prompt_tokens(body.get("prompt"))
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(400, f"'max_tokens' must be an integer in [1, {self.max_tokens_limit}]")
        temperature = _number(body, "temperature", 1.0, low=0.0, high=100.0)
        top_p = _number(body, "top_p", 1.0, low=1e-6, high=1.0)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError(400, "'seed' must be an integer or null")
        if body.get("stream"):
            raise RequestError(400, "'stream': true is not supported by this server; omit it")
        return _Job(adapter, tokens, max_tokens, temperature, top_p, seed)

    def _prompt_tokens(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(400, "this server has no tokenizer: send 'prompt' as a list of token ids")
            tokens = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            tokens = prompt
        else:
            raise RequestError(400, "'prompt' must be a non-empty list of token ids (or a string with a tokenizer)")
        vocab = self.bank.model.get_input_embeddings().weight.shape[0]
        if not tokens or min(tokens) < 0 or max(tokens) >= vocab:
            raise RequestError(400, f"prompt token ids must lie in [0, {vocab})")
        return list(tokens)

    def submit(self, job: _Job) -> List[int]:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server overloaded: {self._queue.maxsize} requests already queued; retry later",
                               "overloaded") from None
        if not job.done.wait(self.request_timeout_s):
            raise RequestError(504, "the request timed out in the queue", "timeout")
        if job.error is not None:
            raise RequestError(500, f"generation failed: {job.error}", "server_error")
        return job.result

    def response(self, job: _Job, new_tokens: List[int], model: str) -> dict:
        text = self.tokenizer.decode(new_tokens) if self.tokenizer is not None else ""
        finish = "stop" if (self.eos_token_id is not None and new_tokens and new_tokens[-1] == self.eos_token_id) \
            else "length"
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "text": text, "tokens": new_tokens, "logprobs": None,
                                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(job.tokens), "completion_tokens": len(new_tokens),
                          "total_tokens": len(job.tokens) + len(new_tokens)}}

    # --- the batching worker

    def _batch_loop(self) -> None:
        while self._running.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs, deadline = [first], time.monotonic() + self.batch_window_s
            while len(jobs) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    jobs.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            self._run(jobs)

    def _run(self, jobs: List[_Job]) -> None:
        try:
            for chunk in self._chunks(jobs):
                self._run_batch(chunk)
        except Exception as exc:  # noqa: BLE001 - every client gets an answer; the worker keeps going
            for job in jobs:
                if not job.done.is_set():
                    job.error = f"{type(exc).__name__}: {exc}"
                    job.done.set()

    def _chunks(self, jobs: List[_Job]):
        """Batches whose distinct adapters fit the bank's capacity at once."""
        chunk, names = [], set()
        for job in jobs:
            if job.adapter is not None and job.adapter not in names and len(names) == self.bank.capacity:
                yield chunk
                chunk, names = [], set()
            chunk.append(job)
            if job.adapter is not None:
                names.add(job.adapter)
        if chunk:
            yield chunk

    def _run_batch(self, jobs: List[_Job]) -> None:
        length = max(len(job.tokens) for job in jobs)
        device = self.bank.device
        ids = torch.full((len(jobs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), length), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding
            ids[row, length - len(job.tokens):] = torch.tensor(job.tokens)
            mask[row, length - len(job.tokens):] = 1
        sample = any(job.temperature > 0 for job in jobs)
        new = generate(self.bank, ids.to(device), mask.to(device), adapters=[job.adapter for job in jobs],
                       max_new_tokens=[job.max_tokens for job in jobs], do_sample=sample,
                       temperature=[job.temperature for job in jobs], top_p=[job.top_p for job in jobs],
                       seed=[job.seed for job in jobs], eos_token_id=self.eos_token_id,
                       pad_token_id=self.pad_token_id)
        for job, tokens in zip(jobs, new):
            job.result = tokens
            job.done.set()


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number in [{low}, {high}]")
    return float(value)


def _handler_for(server: CompletionServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet; errors are answered to the client
            pass

        def _send(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, error: RequestError) -> None:
            headers = {"Retry-After": "1"} if error.status == 503 else None
            self._send(error.status, {"error": {"message": error.message, "type": error.code}}, headers)

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                names = ["base", *server.bank.names()]
                self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            else:
                self._error(RequestError(404, f"no route {self.path}", "not_found"))

        def do_POST(self):  # noqa: N802
            try:
                if self.path != "/v1/completions":
                    raise RequestError(404, f"no route {self.path}; POST /v1/completions", "not_found")
                size = int(self.headers.get("Content-Length") or 0)
                if size > MAX_BODY_BYTES:
                    raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(self.rfile.read(size) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(400, f"malformed JSON: {exc}") from None
                job = server.parse(body)
                tokens = server.submit(job)
                self._send(200, server.response(job, tokens, body.get("model", "base")))
            except RequestError as error:
                self._error(error)

    return Handler
