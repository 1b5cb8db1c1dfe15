"""The built-in server: the API of api.py on uvicorn, in front of a continuous-batching engine.

``CompletionServer(bank, tokenizer, ...)`` wires the pieces: ``start()``/``stop()`` run it in a
background thread (tests, notebooks), ``serve_forever()`` in the calling thread, where SIGINT and
SIGTERM shut it down cleanly (uvicorn stops accepting, answers what is in flight, then the engine
stops). Connections: a listen backlog of 2048, idle keep-alive connections closed after
``idle_timeout_s``, bodies over ``max_body_bytes`` answered 413 (after reading and dropping a bounded amount,
so that a client still sending reads the answer), bodies that do not arrive within
``body_timeout_s`` answered 408 and closed; malformed HTTP is answered 400 by the HTTP parser (h11).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Optional

from .api import Limits, build_app
from .engine import Engine
from .metrics import Metrics

log = logging.getLogger("softprompt_kernels.serving")


def _protocol_class():
    """uvicorn's h11 protocol, with its idle timer also armed while no complete request head has arrived:
    uvicorn's own closes idle keep-alive connections only after a first response, so a client that connects
    and sends nothing (or half a head) would hold its connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_idle_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting_for_a_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_a_head and not self.transport.is_closing():
                self._arm_idle_timer()

        def _arm_idle_timer(self) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    return Protocol


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class CompletionServer:
    def __init__(self, bank, tokenizer=None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
                 max_queue: int = 64, eos_token_id: Optional[int] = None, pad_token_id: int = 0,
                 max_tokens_limit: int = 1024, max_request_tokens: int = 8192, max_prefill_tokens: int = 4096,
                 max_body_bytes: int = 1 << 20, body_timeout_s: float = 10.0, idle_timeout_s: float = 5.0,
                 batching: str = "continuous", backlog: int = 2048):
        import uvicorn

        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (requests waiting beyond the running batch), got {max_queue}")
        self.bank, self.tokenizer = bank, tokenizer
        self.metrics = Metrics()
        self.limits = Limits(max_tokens=max_tokens_limit, max_request_tokens=max_request_tokens,
                             max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
        self.engine = Engine(bank, tokenizer, max_batch=max_batch, max_queue=max_queue, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, max_prefill_tokens=max_prefill_tokens, batching=batching,
                             metrics=self.metrics)
        if not is_loopback(host):
            log.warning("binding %s: the server is reachable from other machines (it has no authentication)", host)
        self.app = build_app(self)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))  # bound here, so that port 0 has its number before start()
        self._sock.listen(backlog)
        config = uvicorn.Config(self.app, http=_protocol_class(), backlog=backlog, timeout_keep_alive=idle_timeout_s, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=30)
        self._uvicorn = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    def start(self) -> "CompletionServer":
        self.engine.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="softprompt-http")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.stop()
        self._sock.close()

    def serve_forever(self) -> None:
        """Until SIGINT or SIGTERM (uvicorn's handlers: in-flight requests are answered first)."""
        import signal

        self.engine.start()
        # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers behind its
        # own, that ends the process normally (exit status 0) instead of as killed
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._uvicorn.run(sockets=[self._sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.engine.stop()
            self._sock.close()
