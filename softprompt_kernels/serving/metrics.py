"""The server's Prometheus metrics (``GET /metrics``), one registry per server."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("softprompt_queue_depth", "requests waiting to join the batch", registry=r)
        self.running_rows = Gauge("softprompt_running_rows", "rows (sequences) in the running batch", registry=r)
        self.tokens = Counter("softprompt_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge("softprompt_tokens_per_second", f"tokens generated per second over the last "
                                  f"{window_s:g} s", registry=r)
        self.requests = Counter("softprompt_requests", "requests answered, by status", ["status"], registry=r)
        self.ttft = Histogram("softprompt_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.latency = Histogram("softprompt_request_latency_seconds", "arrival to last token", registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.per_token = Histogram("softprompt_time_per_output_token_seconds",
                                   "(last token - first token) / (tokens - 1) per choice", registry=r,
                                   buckets=LATENCY_BUCKETS)
        self._window_s = window_s
        self._recent = collections.deque()
        self._lock = threading.Lock()

    def observe_state(self, waiting: int, rows: int) -> None:
        self.queue_depth.set(waiting)
        self.running_rows.set(rows)
        self._update_rate(time.perf_counter())

    def observe_token(self) -> None:
        self.tokens.inc()
        with self._lock:
            self._recent.append(time.perf_counter())

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_request(self, request) -> None:
        if request.first_token_at is None:
            return
        self.latency.observe(request.finished_at - request.arrival)
        for choice in request.choices:
            if len(choice.tokens) > 1:
                self.per_token.observe((request.finished_at - request.first_token_at) / (len(choice.tokens) - 1))

    def answered(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def _update_rate(self, now: float) -> None:
        with self._lock:
            while self._recent and self._recent[0] < now - self._window_s:
                self._recent.popleft()
            self.tokens_per_s.set(len(self._recent) / self._window_s)

    def render(self) -> bytes:
        self._update_rate(time.perf_counter())
        return generate_latest(self.registry)
