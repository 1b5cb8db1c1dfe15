"""Continuous batching over a ``PromptBank``: requests join the running batch at the next decode step
and leave when they finish.

One engine thread owns the model. Each iteration it admits waiting requests (their prompts prefilled
together, within a prefill-token budget, then their KV caches merged into the running batch's, left-
padded), then runs one decode step for every running row (``prefix_attention`` with each row's
``prompt_ids``: adapters mix freely), samples each row with its own parameters and generator, and
drops the rows that finished (EOS, max_tokens, a stop string) or whose client went away. The model
steps are step.py's, those ``PromptBank.generate`` runs. Positions
count each row's real tokens after its prompt, so a row's tokens do not depend on its batch: those of
the same request sent alone.

An exception in a batched step is retried row by row, so that only the row that caused it fails.
``batching="static"`` admits a new batch only when the running one is done (the old server's policy;
the benchmark compares the two). Families whose KV cache has sliding-window layers run static (a
sliding cache keeps one length for the whole batch, so rows cannot join it).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence

import torch

from ..hf import compat
from .step import decode, extend_mask, left_pad, prefill, sample

log = logging.getLogger("softprompt_kernels.serving")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    logprobs: Optional[int] = None          # top-k alternatives per token (0: the chosen token's only)
    ignore_eos: bool = False


@dataclass
class Choice:
    """One generated sequence of a request (``n`` of them)."""

    index: int
    generator: Optional[torch.Generator]
    tokens: List[int] = field(default_factory=list)
    logprobs: List[dict] = field(default_factory=list)   # per token: {"token", "logprob", "top": {id: lp}}
    text: str = ""                                        # text released so far (stop strings held back)
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class Request:
    """A request as the engine runs it; ``on_event(request, choice, delta_text)`` reports progress
    (``choice.finish_reason`` set on its last event; ``request.error`` for a failed request)."""

    def __init__(self, adapter: Optional[str], prompt: List[int], params: SamplingParams, n: int = 1,
                 on_event: Optional[Callable[["Request", Choice, str], None]] = None):
        self.adapter, self.prompt, self.params, self.n = adapter, list(prompt), params, n
        self.on_event = on_event
        seeds = [params.seed + i if params.seed is not None else None for i in range(n)]
        self.choices = [Choice(i, torch.Generator().manual_seed(s) if s is not None else None) for i, s in
                        enumerate(seeds)]
        self.arrival = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.cancelled = False
        self.error: Optional[str] = None
        self.done = threading.Event()

    def cancel(self) -> None:
        """The client went away: the engine drops its rows at the next step."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


@dataclass
class _Row:
    request: Request
    choice: Choice
    pending: int                     # the sampled token not yet fed to the model


class EngineFull(Exception):
    """The waiting queue is full (answered 503 with Retry-After)."""


class Engine:
    def __init__(self, bank, tokenizer=None, max_batch: int = 16, max_queue: int = 64, eos_token_id=None,
                 pad_token_id: int = 0, max_prefill_tokens: int = 4096, batching: str = "continuous",
                 metrics=None):
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {batching!r}")
        if max_batch < 1 or max_queue < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch, max_queue and max_prefill_tokens must be >= 1")
        self.bank, self.tokenizer = bank, tokenizer
        self.model = bank.model
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.metrics = metrics
        self.batching = batching
        self._joinable = compat.cache_is_joinable(self.model)
        if batching == "continuous" and not self._joinable:
            log.warning("the KV cache of %s has sliding-window layers: rows cannot join a running batch, "
                        "so batching is static", bank.family.model_type)
            self.batching = "static"
        self._waiting: Deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._rows: List[_Row] = []
        self._cache = None
        self._mask: Optional[torch.Tensor] = None   # [B, L] of the running rows
        self._context = None
        self._row_lengths: Optional[torch.Tensor] = None
        self._running = False
        self._thread: Optional[threading.Thread] = None

    # --- the public side (any thread)

    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    # --- the engine thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not self._rows:
                    self._lock.wait(0.1)
                if not self._running:
                    break
            try:
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - the engine must outlive any bug: fail what is running
                log.exception("engine step failed")
                for row in self._rows:
                    self._fail(row.request, f"{type(exc).__name__}: {exc}")
                self._reset_batch()
            if self.metrics is not None:
                self.metrics.observe_state(len(self._waiting), len(self._rows))
        for row in self._rows:
            self._fail(row.request, "the server is shutting down")
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self._fail(request, "the server is shutting down")

    def _admit(self) -> None:
        if self.batching == "static" and self._rows:
            return
        group: List[Request] = []
        tokens = 0
        adapters = {row.request.adapter for row in self._rows} - {None}
        with self._lock:
            while self._waiting:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    self._finish_request(request)
                    continue
                rows = len(self._rows) + sum(r.n for r in group) + request.n
                wanted = adapters | ({request.adapter} - {None})
                cost = len(request.prompt) * request.n
                if rows > self.max_batch or len(wanted) > self.bank.capacity or \
                        (group and tokens + cost > self.max_prefill_tokens):
                    break
                group.append(self._waiting.popleft())
                tokens, adapters = tokens + cost, wanted
        if group:
            self._prefill(group)

    def _prefill(self, group: List[Request]) -> None:
        try:
            rows, cache, mask, logits = self._prefill_rows(group)
        except Exception as exc:  # noqa: BLE001 - isolate: each request alone, only the culprit fails
            if len(group) == 1:
                self._fail(group[0], f"{type(exc).__name__}: {exc}")
                return
            for request in group:
                self._prefill([request])
            return
        self._advance(rows, logits)
        self._join(rows, cache, mask)

    def _prefill_rows(self, group: List[Request]):
        rows = [_Row(request, choice, -1) for request in group for choice in request.choices]
        ids, mask = left_pad([row.request.prompt for row in rows], self.pad_token_id, self.bank.device)
        prefilled = prefill(self.bank, ids, mask, [row.request.adapter for row in rows])
        return rows, prefilled.cache, mask, prefilled.logits

    def _decode(self) -> None:
        rows = self._rows
        tokens = torch.tensor([row.pending for row in rows], device=self.bank.device)
        mask = extend_mask(self._mask)
        snapshot = compat.cache_snapshot(self._cache)
        try:
            logits = decode(self.bank, tokens, mask, self._cache, self._context, self._row_lengths)
        except Exception:  # noqa: BLE001 - retried row by row below, from the cache as it was before the step
            compat.cache_restore(snapshot)
            self._decode_row_by_row(tokens, mask)
            return
        self._mask = mask
        self._advance(rows, logits)
        self._drop_finished()

    def _decode_row_by_row(self, tokens, mask) -> None:
        """A batched step failed: each row alone (on a copy of its cache) finds the rows that fail alone; they
        fail, and the step runs again, batched, for the others."""
        keep = []
        for i, row in enumerate(self._rows):
            cache = compat.cache_select(self._cache, torch.tensor([i], device=self.bank.device))
            context, row_lengths = self.bank.context_for([row.request.adapter])
            try:
                decode(self.bank, tokens[i:i + 1], mask[i:i + 1], cache, context, row_lengths)
                keep.append(i)
            except Exception as exc:  # noqa: BLE001
                self._fail(row.request, f"{type(exc).__name__}: {exc}")
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.bank.device)
        rows = [self._rows[i] for i in keep]
        self._rows, self._cache, self._mask = rows, compat.cache_select(self._cache, index), self._mask[index]
        self._rebuild_context()
        tokens, mask = tokens[index], mask[index]
        try:
            logits = decode(self.bank, tokens, mask, self._cache, self._context, self._row_lengths)
        except Exception as exc:  # noqa: BLE001 - fails batched but not alone: fail them, the engine goes on
            for row in rows:
                self._fail(row.request, f"{type(exc).__name__}: {exc}")
            self._reset_batch()
            return
        self._mask = mask
        self._advance(rows, logits)
        self._drop_finished()

    # --- rows: sampling, finishing, joining

    def _advance(self, rows: List[_Row], logits: torch.Tensor) -> None:
        """Samples one token per row from ``logits [len(rows), V]`` and reports it."""
        temperatures = torch.tensor([r.request.params.temperature for r in rows], device=logits.device)
        top_ps = torch.tensor([r.request.params.top_p for r in rows], device=logits.device)
        chosen = sample(logits, temperatures, top_ps, [r.choice.generator for r in rows]).tolist()
        want_logprobs = [r.request.params.logprobs is not None for r in rows]
        log_probs = torch.log_softmax(logits.float(), dim=-1) if any(want_logprobs) else None
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(rows, chosen)):
            request, choice, params = row.request, row.choice, row.request.params
            if request.first_token_at is None:
                request.first_token_at = now
                if self.metrics is not None:
                    self.metrics.observe_first_token(now - request.arrival)
            choice.tokens.append(token)
            row.pending = token
            if log_probs is not None and want_logprobs[i]:
                top = {}
                if params.logprobs:
                    values, ids = log_probs[i].topk(params.logprobs)
                    top = dict(zip(ids.tolist(), values.tolist()))
                choice.logprobs.append({"token": token, "logprob": float(log_probs[i, token]), "top": top})
            reason = None
            if token == self.eos_token_id and not params.ignore_eos:
                reason = "stop"
            elif len(choice.tokens) >= params.max_tokens:
                reason = "length"
            delta, stopped = self._text(choice, params, final=reason is not None)
            if stopped:
                reason = "stop"
            if reason is not None:
                choice.finish_reason = reason
            if self.metrics is not None:
                self.metrics.observe_token()
            if request.on_event is not None:
                request.on_event(request, choice, delta)
            if request.finished:
                self._finish_request(request)

    def _text(self, choice: Choice, params: SamplingParams, final: bool):
        """(text newly released, whether a stop string ended the choice); text held back while it may
        still become a stop string or is an incomplete character."""
        if self.tokenizer is None:
            return "", False
        full = self.tokenizer.decode(choice.tokens, skip_special_tokens=True)
        for stop in params.stop:
            at = full.find(stop, max(0, len(choice.text) - len(stop)))
            if at >= 0:
                cut = full[:at]
                delta, choice.text = cut[len(choice.text):], cut
                return delta, True
        end = len(full)
        if not final:
            while end > len(choice.text) and full[end - 1] == "\ufffd":  # an incomplete character
                end -= 1
            hold = 0
            for stop in params.stop:  # the longest tail that may still grow into a stop string
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if full[end - size:end] == stop[:size]:
                        hold = max(hold, size)
                        break
            end -= hold
        end = max(end, len(choice.text))
        delta, choice.text = full[len(choice.text):end], full[:end]
        return delta, False

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if row.choice.finish_reason is None and
                not row.request.cancelled and row.request.error is None]
        for row in self._rows:
            if row.request.cancelled:
                self._finish_request(row.request)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.bank.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache = compat.cache_select(self._cache, index)
        self._mask = self._mask[index]
        if self._joinable:  # a sliding layer's length is the whole batch's: its front stays
            self._trim_padding()
        self._rebuild_context()

    def _join(self, rows: List[_Row], cache, mask: torch.Tensor) -> None:
        live = [i for i, row in enumerate(rows) if row.choice.finish_reason is None and not row.request.cancelled]
        for row in rows:
            if row.request.cancelled:
                self._finish_request(row.request)
        if not live:
            return
        if len(live) < len(rows):
            index = torch.tensor(live, device=self.bank.device)
            cache, mask, rows = compat.cache_select(cache, index), mask[index], [rows[i] for i in live]
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
        else:
            self._cache = compat.cache_merge(self._cache, cache)
            width = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
            self._rows = self._rows + rows
        if self._joinable:
            self._trim_padding()
        self._rebuild_context()

    def _trim_padding(self) -> None:
        """Drops the leading columns that are padding in every row (left by rows that left)."""
        real = self._mask.any(0).nonzero()
        first = int(real[0]) if real.numel() else 0
        if first > 0:
            self._mask = self._mask[:, first:]
            compat.cache_drop_front(self._cache, first)

    def _rebuild_context(self) -> None:
        self._context, self._row_lengths = self.bank.context_for([row.request.adapter for row in self._rows])

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._context, self._row_lengths = [], None, None, None, None

    def _fail(self, request: Request, message: str) -> None:
        if request.done.is_set():
            return
        request.error = message
        for choice in request.choices:
            if choice.finish_reason is None:
                choice.finish_reason, choice.error = "error", message
        if request.on_event is not None:
            request.on_event(request, request.choices[0], "")
        self._finish_request(request)  # its rows leave the batch at the next _drop_finished

    def _finish_request(self, request: Request) -> None:
        if request.done.is_set():
            return
        request.finished_at = time.perf_counter()
        if self.metrics is not None and request.error is None and not request.cancelled:
            self.metrics.observe_request(request)
        request.done.set()


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
