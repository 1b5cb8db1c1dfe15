"""Serving soft prompts on vLLM: tokens/s and latency with 1, 8 and 64 distinct adapters in the batch.

``softprompt-kernels bench --suite vllm-serve-cpu`` (run it in the vLLM environment: ``.venv-vllm/bin/...``)
starts three OpenAI-compatible servers over the same toy Llama (4 layers, hidden 256, head_dim 32) and sends
each the same requests: ``requests`` prompts of 16-48 text tokens, ``max_tokens`` new tokens each (greedy,
ignoring EOS on vLLM), ``concurrency`` streams at a time:

- ``vllm``: vLLM serving the bare model, no plugin loaded (``VLLM_PLUGINS=""``) — the floor;
- ``vllm+softprompt``: vLLM with this package's plugin, each request naming one of ``adapters`` adapters
  (prompt tuning, P-tuning, prefix tuning with and without projection, k = 16);
- ``builtin``: this package's own server (PromptBank, continuous batching) with the same adapters.

Per provider: tokens/s (generated tokens over the makespan), time to first token and inter-token latency
p50/p99 from the client's stream; the providers take turns for ``rounds`` rounds and each reports its median
round (every round's tokens/s is kept in the record). ms is the makespan. Both vLLM servers run vLLM's defaults (compiled model,
prefix caching on).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from .harness import Record, Suite, Timing, device_name, free_port, git_commit

BENCH = "vllm_serving"
PROVIDERS = ("vllm", "vllm+softprompt", "builtin")
CASE_KEY = "vllm: bare model, no plugin (the floor); vllm+softprompt: the plugin, each request naming an adapter"


@dataclass(frozen=True)
class Case:
    adapters: int
    requests: int = 96
    concurrency: int = 32
    max_tokens: int = 32
    k: int = 16
    hidden: int = 256
    layers: int = 4
    compiled: bool = True  # vLLM's default; the quick suite runs eager (a server starts in seconds, not a minute)
    rounds: int = 3        # the providers take turns, round after round; each reports its median round
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.adapters} adapters, {self.requests} requests, {self.concurrency} concurrent, k={self.k}"


SUITES = {
    "vllm-serve-cpu": Suite("vllm-serve-cpu", "cpu", [Case(1), Case(8), Case(64)], Timing()),
    "vllm-serve-cpu-quick": Suite("vllm-serve-cpu-quick", "cpu",
                                  [Case(2, requests=8, concurrency=4, max_tokens=4, k=4, hidden=128, layers=2,
                                        compiled=False, rounds=1)],
                                  Timing()),
    "vllm-serve-gpu": Suite("vllm-serve-gpu", "cuda", [Case(1), Case(8), Case(64)], Timing()),
}
ADAPTER_KINDS = ("prompt5", "ptune_mlp4", "prefix4", "prefix_proj6")  # each made with k virtual tokens


def known_providers() -> List[str]:
    return list(PROVIDERS)


# --- servers


def http(port: int, path: str, payload=None, method: Optional[str] = None, raw: Optional[bytes] = None,
         timeout: float = 120):
    """(status, body) of one request to 127.0.0.1:port."""
    data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class ServerProcess:
    """A server started as a subprocess, ready once GET /health answers 200; its output goes to ``log_path``."""

    def __init__(self, command: Sequence[str], port: int, log_path: str, env: Optional[Dict[str, str]] = None):
        self.command, self.port, self.log_path = list(command), port, log_path
        self._log = open(log_path, "w+")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout_s: float = 420) -> "ServerProcess":
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http(self.port, "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def vllm_command(model_dir: str, adapters: Dict[str, str], port: int, *extra: str) -> List[str]:
    args = [sys.executable, "-m", "softprompt_kernels.cli", "serve", "--engine", "vllm", "--model", model_dir]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return args + ["--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", *extra]


# --- load


@dataclass
class _Stream:
    start: float
    chunks: List[float]  # arrival time of each chunk that carried text
    tokens: int


def _stream_one(port: int, payload: dict) -> _Stream:
    body = json.dumps({**payload, "stream": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    start, chunks = time.perf_counter(), []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            choice = json.loads(line[6:])["choices"]
            if choice and choice[0].get("text"):
                chunks.append(time.perf_counter())
    return _Stream(start, chunks, len(chunks))


def _workload(case: Case, names: Sequence[Optional[str]], vllm: bool) -> List[dict]:
    from .toy_task import WORDS

    rng = random.Random(case.seed)
    out = []
    for i in range(case.requests):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 48)))
        payload = {"prompt": text, "max_tokens": case.max_tokens, "temperature": 0}
        if names[i % len(names)] is not None:  # no "model": the served base model (plain vLLM knows no "base")
            payload["model"] = names[i % len(names)]
        if vllm:
            payload["ignore_eos"] = True
        out.append(payload)
    return out


def _run_load(port: int, payloads: List[dict], concurrency: int) -> Dict[str, float]:
    for payload in payloads[:2]:  # warm-up (first requests compile shapes, fill caches)
        _stream_one(port, payload)
    begin = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        streams = list(pool.map(lambda p: _stream_one(port, p), payloads))
    makespan = max(s.chunks[-1] for s in streams if s.chunks) - begin
    ttft = [s.chunks[0] - s.start for s in streams if s.chunks]
    itl = [b - a for s in streams for a, b in zip(s.chunks, s.chunks[1:])]
    tokens = sum(s.tokens for s in streams)
    return {"seconds": makespan, "tokens": tokens, "tokens_per_s": tokens / makespan,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * statistics.median(itl) if itl else 0.0,
            "itl_p99_ms": 1e3 * _percentile(itl, 0.99) if itl else 0.0}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the suite


class _Fleet:
    """The three servers of a workload geometry, started once for every case of a suite run."""

    def __init__(self, case: Case, device: str, max_adapters: int):
        import torch
        from transformers import AutoModelForCausalLM

        from .toy_adapters import KINDS, make_adapter
        from .toy_task import llama_dir

        self.root = tempfile.mkdtemp(prefix="sk-vllm-bench-")
        self.model_dir = llama_dir(os.path.join(self.root, "model"), hidden=case.hidden, layers=case.layers,
                                   heads=case.hidden // 32, kv_heads=max(1, case.hidden // 64), positions=512)
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.adapters: Dict[str, str] = {}
        for i in range(max_adapters):
            kind = ADAPTER_KINDS[i % len(ADAPTER_KINDS)]
            model = make_adapter(base, kind, seed=i, num_virtual_tokens=case.k)
            path = os.path.join(self.root, f"a{i}")
            model.save_pretrained(path)
            self.adapters[f"a{i}"] = path
        assert all(kind in KINDS for kind in ADAPTER_KINDS)
        self.servers: Dict[str, ServerProcess] = {}
        self.device, self.compiled = device, case.compiled

    def server(self, provider: str) -> ServerProcess:
        if provider in self.servers:
            return self.servers[provider]
        # the servers stay up for every case (an idle server waits on its socket; starting one takes a minute)
        port = free_port()
        log = os.path.join(self.root, f"{provider.replace('+', '_')}.log")
        dtype = ["--dtype", "float32"]
        engine = ["--max-model-len", "512"] + ([] if self.compiled else ["-O0", "--enforce-eager"])
        if provider == "vllm":
            command = vllm_command(self.model_dir, {}, port, *engine)
            env = {"VLLM_PLUGINS": ""}  # an allowlist that matches nothing: vLLM exactly as shipped
        elif provider == "vllm+softprompt":
            command = vllm_command(self.model_dir, self.adapters, port, *engine)
            env = {}
        else:
            command = [sys.executable, "-m", "softprompt_kernels.cli", "serve", "--model", self.model_dir,
                       "--port", str(port), "--max-batch", "32", "--capacity", str(len(self.adapters)),
                       "--device", self.device, *dtype]
            for name, path in self.adapters.items():
                command += ["--adapter", f"{name}={path}"]
            env = {}
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        print(f"  starting {provider} ...", flush=True)
        self.servers[provider] = ServerProcess(command, port, log, env).wait_ready()
        return self.servers[provider]

    def close(self) -> None:
        import shutil

        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        shutil.rmtree(self.root, ignore_errors=True)


_FLEETS: Dict[tuple, _Fleet] = {}


def measure(case: Case, device, providers: Optional[Sequence[str]], timing: Timing) -> List[Record]:
    import atexit
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("the vllm-serve suites run in the vLLM environment: .venv-vllm/bin/softprompt-kernels "
                         "bench --suite vllm-serve-cpu (make test-vllm creates it)")
    device = str(device)
    geometry = (case.hidden, case.layers, case.k, case.compiled, device)
    fleet = _FLEETS.get(geometry)
    if fleet is None:
        fleet = _FLEETS[geometry] = _Fleet(case, device, max_adapters=64 if case.adapters <= 64 else case.adapters)
        atexit.register(fleet.close)
    names = [f"a{i}" for i in range(case.adapters)]
    chosen = [p for p in PROVIDERS if providers is None or p in providers]
    servers = {provider: fleet.server(provider) for provider in chosen}
    rounds: Dict[str, List[Dict[str, float]]] = {provider: [] for provider in chosen}
    for _ in range(case.rounds):  # interleaved: a load that comes and goes on the machine hits every provider
        for provider in chosen:
            payloads = _workload(case, [None] if provider == "vllm" else names, vllm=provider != "builtin")
            rounds[provider].append(_run_load(servers[provider].port, payloads, case.concurrency))
    results = {}
    for provider, runs in rounds.items():
        median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        results[provider] = {**median, "round_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs]}
        print(f"  {provider}: {median['tokens_per_s']:.0f} tokens/s (rounds: {results[provider]['round_tokens_per_s']})",
              flush=True)
    return [Record(bench=BENCH, provider=name, device=device_name(device), commit=git_commit(),
                   config={"name": case.name, **asdict(case), **summary}, ms=1e3 * summary["seconds"],
                   tflops=0.0, gbps=0.0, peak_mem_mb=None) for name, summary in results.items()]


def goals(records: Sequence[Record]) -> List[str]:
    """With 8 and with 64 distinct adapters in the batch: >= 0.9x the tokens/s of vLLM serving the bare model."""
    by: Dict[int, Dict[str, Record]] = {}
    for r in records:
        by.setdefault(r.config["adapters"], {})[r.provider] = r
    lines = []
    for adapters, providers in sorted(by.items()):
        if {"vllm", "vllm+softprompt"} <= set(providers):
            ours, floor = providers["vllm+softprompt"].config, providers["vllm"].config
            ratio = ours["tokens_per_s"] / floor["tokens_per_s"]
            verdict = f"(goal >= 0.9x: {'met' if ratio >= 0.9 else 'NOT met'})" if adapters in (8, 64) else ""
            lines.append(f"{adapters} adapters: vllm+softprompt {ours['tokens_per_s']:.0f} vs bare vLLM "
                         f"{floor['tokens_per_s']:.0f} tokens/s = {ratio:.2f}x {verdict}".rstrip())
        if {"builtin", "vllm+softprompt"} <= set(providers):
            ratio = providers["vllm+softprompt"].config["tokens_per_s"] / providers["builtin"].config["tokens_per_s"]
            lines.append(f"{adapters} adapters: vllm+softprompt vs the built-in server: {ratio:.2f}x tokens/s")
    return lines
