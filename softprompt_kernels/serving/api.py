"""The HTTP API (FastAPI on uvicorn): OpenAI-style completions and chat completions over the engine.

    POST /v1/completions        {"model": adapter | "base", "prompt": text | [token ids], "max_tokens", "stream",
                                 "stop", "n", "logprobs", "echo", "temperature", "top_p", "seed", ...}
    POST /v1/chat/completions   {"model", "messages": [...], ...} (the tokenizer's chat template)
    GET  /v1/models, /health, /metrics (Prometheus text)

Every request is validated where it is parsed (schemas.py, then the limits of the model and the server),
so that nothing a client sends can fail another request: 400 naming the field, 404 for an unknown
adapter, 413 for a body over the limit, 408 for a body that does not arrive, 503 + Retry-After when
the queue is full. ``stream: true`` answers server-sent events, one per token.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import List, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .engine import EngineFull, Request, SamplingParams
from .schemas import ChatRequest, CompletionRequest, describe_validation_error

RESERVED_NAMES = ("base",)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": error.message, "type": error.code, "param": error.param,
                                   "code": error.code}}, status_code=error.status, headers=error.headers)


@dataclass
class Limits:
    max_tokens: int = 1024             # per choice
    max_request_tokens: int = 8192     # prompt + n * max_tokens
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0
    retry_after_s: int = 1
    # A body over the limit is read and dropped up to this many bytes (within body_timeout_s) before the 413:
    # a server that closes while its client still sends makes the client's system reset the connection, and the
    # client then never reads the answer. Past it the 413 goes out at once and the connection is closed.
    max_drain_bytes: int = 8 << 20


async def read_json(request: HTTPRequest, limits: Limits):
    """The body as JSON, within the size limit and the time limit; APIError otherwise."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else 0
    if declared > limits.max_drain_bytes:  # not worth reading: answered at once
        raise _too_large(declared, limits, drained=False)
    body, received = bytearray(), 0

    async def read() -> None:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received <= limits.max_body_bytes:
                body.extend(chunk)
            elif received > limits.max_drain_bytes:
                return

    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
        drained = received <= limits.max_drain_bytes
    except asyncio.TimeoutError:
        if max(declared, received) <= limits.max_body_bytes:
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                           headers={"Connection": "close"}) from None
        drained = False
    if max(declared, received) > limits.max_body_bytes:
        raise _too_large(declared, limits, drained)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSON errors, 5000-digit integers, deep nesting
        message = str(exc).splitlines()[0][:200] if not isinstance(exc, RecursionError) else "nested too deeply"
        raise APIError(400, f"the body is not valid JSON: {message}") from None


def _too_large(declared: int, limits: Limits, drained: bool) -> APIError:
    size = f" of {declared} bytes" if declared else ""
    return APIError(413, f"request body{size} is over the limit of {limits.max_body_bytes} bytes",
                    headers=None if drained else {"Connection": "close"})


class Handler:
    """Turns validated requests into engine requests and engine events into responses."""

    def __init__(self, server):
        self.server = server
        self.engine, self.bank, self.tokenizer = server.engine, server.bank, server.tokenizer
        self.limits: Limits = server.limits
        config = self.bank.model.config.get_text_config()
        self.positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab = self.bank.model.get_input_embeddings().weight.shape[0]

    # --- validation past the schema

    def adapter(self, model: str) -> Optional[str]:
        if model in RESERVED_NAMES:
            return None
        if model not in self.bank:
            raise APIError(404, f"the model (adapter) {model!r} does not exist; served: {self.served()}", "model",
                           "model_not_found")
        return model

    def served(self) -> List[str]:
        return ["base", *self.bank.names()]

    def prompt_tokens(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this server has no tokenizer: send 'prompt' as a list of token ids", "prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise APIError(400, f"'prompt' token ids must lie in [0, {self.vocab})", "prompt")
        return list(prompt)

    def check_lengths(self, tokens: List[int], adapter: Optional[str], max_tokens: int, n: int) -> None:
        if not tokens:
            raise APIError(400, "'prompt' tokenizes to no tokens", "prompt")
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"'max_tokens' must be at most {self.limits.max_tokens} on this server", "max_tokens")
        k = self.bank.prompt_length(adapter) if adapter is not None else 0
        if self.positions is not None:
            room = self.positions - k
            if len(tokens) > room - 1:
                raise APIError(400, f"'prompt' has {len(tokens)} tokens; this model has {self.positions} positions "
                                    f"and the adapter takes {k}: at most {room - 1} prompt tokens", "prompt")
            if len(tokens) + max_tokens > room:
                raise APIError(400, f"'max_tokens' {max_tokens} with a {len(tokens)}-token prompt passes the model's "
                                    f"{self.positions} positions (adapter: {k}): at most {room - len(tokens)}",
                               "max_tokens")
        total = len(tokens) + n * max_tokens
        if total > self.limits.max_request_tokens:
            raise APIError(400, f"the request asks for {total} tokens (prompt {len(tokens)} + n {n} x max_tokens "
                                f"{max_tokens}); the limit per request is {self.limits.max_request_tokens}",
                           "max_tokens")

    def sampling(self, body, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        stops = body.stop_list
        if stops and self.tokenizer is None:
            raise APIError(400, "'stop' needs a tokenizer (this server has none): stop strings cannot be matched",
                           "stop")
        return SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
                              seed=body.seed, stop=stops, logprobs=logprobs)

    # --- running

    async def run(self, http: HTTPRequest, adapter, tokens, params, n, render, stream: bool, include_usage: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(request: Request, choice, delta: str) -> None:  # the engine thread
            loop.call_soon_threadsafe(events.put_nowait, (choice.index, delta, len(choice.tokens),
                                                          choice.finish_reason, request.error))

        request = Request(adapter, tokens, params, n=n, on_event=on_event)
        try:
            self.engine.submit(request)
        except EngineFull as exc:
            raise APIError(503, f"server overloaded ({exc}); retry later", code="overloaded",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        if stream:
            return StreamingResponse(self._stream(http, request, events, render, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        remaining = n
        while remaining:
            try:
                _, _, _, finish, error = await asyncio.wait_for(events.get(), 0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    return Response(status_code=499)
                continue
            if error is not None:
                raise APIError(500, f"generation failed: {error}", code="server_error")
            if finish is not None:
                remaining -= 1
        return JSONResponse(render.full(request))

    async def _stream(self, http, request: Request, events: asyncio.Queue, render, include_usage: bool):
        remaining = request.n
        sent = [0] * request.n
        try:
            while remaining:
                index, delta, count, finish, error = await events.get()
                if error is not None:
                    yield _sse({"error": {"message": f"generation failed: {error}", "type": "server_error"}})
                    break
                choice = request.choices[index]
                # up to the event's count: the engine thread may have appended the next tokens already
                new_tokens = choice.tokens[sent[index]:count]
                new_logprobs = choice.logprobs[sent[index]:count]
                first = sent[index] == 0 and count > 0
                sent[index] = count
                yield _sse(render.chunk(index, delta, new_tokens, new_logprobs, finish, first))
                if finish is not None:
                    remaining -= 1
            else:
                if include_usage:
                    yield _sse(render.usage_chunk(request))
                yield "data: [DONE]\n\n"
        finally:
            if not request.done.is_set():
                request.cancel()  # the client went away: its rows leave the batch at the next step


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Render:
    """The OpenAI response shapes of one request (completion or chat)."""

    def __init__(self, handler: Handler, model: str, chat: bool, echo_text: str = "", prompt_tokens: int = 0,
                 top_logprobs: Optional[int] = None):
        self.handler, self.model, self.chat = handler, model, chat
        self.echo_text, self.prompt_tokens, self.top_logprobs = echo_text, prompt_tokens, top_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _token_text(self, token: int) -> str:
        tok = self.handler.tokenizer
        return tok.decode([token]) if tok is not None else f"token_id:{token}"  # vLLM's spelling without one

    def _logprobs(self, entries: List[dict]):
        if not entries:
            return None
        if self.chat:
            return {"content": [{"token": self._token_text(e["token"]), "logprob": e["logprob"],
                                 "top_logprobs": [{"token": self._token_text(t), "logprob": lp}
                                                  for t, lp in e["top"].items()]} for e in entries]}
        return {"tokens": [self._token_text(e["token"]) for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [self._top(e["top"]) for e in entries],
                "token_ids": [e["token"] for e in entries]}

    def _top(self, top: dict) -> dict:
        """{token text: logprob}, OpenAI's shape; a token whose text is empty or already a key keeps its id."""
        out = {}
        for token, logprob in top.items():
            text = self._token_text(token)
            out[text if text and text not in out else f"token_id:{token}"] = logprob
        return out

    def _usage(self, request: Request) -> dict:
        completion = sum(len(c.tokens) for c in request.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def full(self, request: Request) -> dict:
        choices = []
        for c in request.choices:
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason,
                                "tokens": c.tokens})
            else:
                choices.append({"index": c.index, "text": self.echo_text + c.text, "tokens": c.tokens,
                                "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage(request)}

    def chunk(self, index: int, delta: str, tokens: List[int], logprobs: List[dict], finish: Optional[str],
              first: bool) -> dict:
        """One event of a choice; ``first``: it carries the choice's first token (the role, the echo)."""
        if self.chat:
            message = ({"role": "assistant"} if first else {}) | ({"content": delta} if delta or first else {})
            choice = {"index": index, "delta": message,
                      "tokens": tokens, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        else:
            echo = self.echo_text if first else ""
            choice = {"index": index, "text": echo + delta, "tokens": tokens, "logprobs": self._logprobs(logprobs),
                      "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, request: Request) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self._usage(request)}


def build_app(server) -> FastAPI:
    app = FastAPI(title="softprompt-kernels", docs_url=None, redoc_url=None, openapi_url=None)
    handler = Handler(server)
    metrics = server.metrics

    def parse(model_class, body):
        try:
            return model_class.model_validate(body)
        except ValidationError as error:
            message, field = describe_validation_error(error)
            raise APIError(400, message, field) from None

    @app.exception_handler(APIError)
    async def _api_error(_request, error: APIError):
        metrics.answered(error.status)
        return error_response(error)

    @app.exception_handler(404)
    async def _not_found(request, _exc):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _not_allowed(request, _exc):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": server.engine.queue_depth, "running_rows": server.engine.running_rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "softprompt-kernels"}
                                           for n in handler.served()]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse(CompletionRequest, await read_json(http, handler.limits))
        adapter = handler.adapter(body.model)
        tokens = handler.prompt_tokens(body.prompt)
        handler.check_lengths(tokens, adapter, body.max_tokens, body.n)
        params = handler.sampling(body, body.max_tokens, body.logprobs)
        echo = ""
        if body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else (
                handler.tokenizer.decode(tokens) if handler.tokenizer is not None else "")
        render = _Render(handler, body.model, chat=False, echo_text=echo, prompt_tokens=len(tokens))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response = await handler.run(http, adapter, tokens, params, body.n, render, body.stream, include_usage)
        metrics.answered(response.status_code)
        return response

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = parse(ChatRequest, await read_json(http, handler.limits))
        adapter = handler.adapter(body.model)
        tokenizer = handler.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is the client's 400
            raise APIError(400, f"the chat template rejects these messages: {exc}", "messages") from None
        if isinstance(tokens, dict) or hasattr(tokens, "input_ids"):
            tokens = tokens["input_ids"]
        tokens = list(tokens)
        handler.check_lengths(tokens, adapter, body.new_tokens, body.n)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = handler.sampling(body, body.new_tokens, top)
        render = _Render(handler, body.model, chat=True, prompt_tokens=len(tokens))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response = await handler.run(http, adapter, tokens, params, body.n, render, body.stream, include_usage)
        metrics.answered(response.status_code)
        return response

    return app
