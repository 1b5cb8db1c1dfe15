"""Serving under load: continuous batching vs static batching, mixed adapters, open-loop arrivals.

``softprompt-kernels bench --suite serve-load-cpu`` drives the serving engine in-process (no HTTP, so
that the batching policy is what is measured) with requests naming 8 adapters at random, prompts of
8-32 tokens and 4-48 new tokens (greedy), under three policies:

- ``continuous``: the engine (serving/engine.py): requests join the running batch at the next step;
- ``static``: the same engine admitting a new batch only when the running one has finished;
- ``today``: the previous server's loop, verbatim in policy: take up to ``max_batch`` waiting requests,
  run ``PromptBank.generate`` on them to the end, repeat.

Two cases: **poisson**, an open-loop Poisson arrival process at ``load`` x the rate ``today`` sustains
at saturation (measured first, on this machine): time to first token and time per output token,
p50/p99; and **saturation**, every request queued at once: tokens/s. Records carry the latencies in
their config; ms is the makespan.
"""
from __future__ import annotations

import queue
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .harness import Record, Suite, Timing, device_name, git_commit

BENCH = "serving_load"
PROVIDERS = ("today", "static", "continuous")
CASE_KEY = "poisson: open-loop arrivals at load x today's saturated rate; saturation: all requests queued at once"


@dataclass(frozen=True)
class Case:
    kind: str                      # "poisson" | "saturation"
    requests: int = 96
    adapters: int = 8
    max_batch: int = 16
    load: float = 0.7
    hidden: int = 256
    layers: int = 4
    vocab: int = 1000
    k: int = 16
    min_new: int = 4
    max_new: int = 48
    seed: int = 0

    @property
    def name(self) -> str:
        what = f"Poisson at {self.load:g}x today's saturated rate" if self.kind == "poisson" else "saturation"
        return f"{what}, {self.requests} requests, {self.adapters} adapters, max batch {self.max_batch}"


SUITES = {
    "serve-load-cpu": Suite("serve-load-cpu", "cpu", [Case("saturation"), Case("poisson")], Timing()),
    "serve-load-cpu-quick": Suite("serve-load-cpu-quick", "cpu",
                                  [Case("saturation", requests=12, adapters=2, max_batch=4, hidden=64, layers=2,
                                        vocab=100, k=4, max_new=8),
                                   Case("poisson", requests=12, adapters=2, max_batch=4, hidden=64, layers=2,
                                        vocab=100, k=4, max_new=8)], Timing()),
}


def known_providers() -> List[str]:
    return list(PROVIDERS)


@dataclass
class _Spec:
    adapter: str
    prompt: List[int]
    max_tokens: int


def _workload(case: Case) -> List[_Spec]:
    rng = random.Random(case.seed)
    return [_Spec(f"a{rng.randrange(case.adapters)}", [rng.randrange(3, case.vocab) for _ in range(rng.randint(8, 32))],
                  rng.randint(case.min_new, case.max_new)) for _ in range(case.requests)]


def _bank(case: Case, device):
    import transformers

    import softprompt_kernels as sk

    config = transformers.LlamaConfig(hidden_size=case.hidden, intermediate_size=case.hidden * 11 // 4,
                                      num_hidden_layers=case.layers, num_attention_heads=8, num_key_value_heads=4,
                                      vocab_size=case.vocab, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    bank = sk.PromptBank(model, capacity=case.adapters)
    gen = torch.Generator().manual_seed(1)
    for i in range(case.adapters):
        bank.add(f"a{i}", 0.3 * torch.randn(case.k, case.hidden, generator=gen), kind="prompt")
    return bank


@dataclass
class _Timing:
    arrival: float
    first: Optional[float] = None
    done: Optional[float] = None
    tokens: int = 0


def _run_engine(bank, specs, arrivals, batching: str, max_batch: int) -> List[_Timing]:
    from ..serving.engine import Engine, Request, SamplingParams

    engine = Engine(bank, max_batch=max_batch, max_queue=len(specs) + 1, batching=batching).start()
    try:
        start = time.perf_counter()
        requests = []
        for spec, at in zip(specs, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            requests.append(engine.submit(Request(spec.adapter, spec.prompt, SamplingParams(
                max_tokens=spec.max_tokens, temperature=0, ignore_eos=True))))
        for request in requests:
            request.done.wait(600)
    finally:
        engine.stop()
    return [_Timing(r.arrival, r.first_token_at, r.finished_at, len(r.choices[0].tokens)) for r in requests]


def _run_today(bank, specs, arrivals, max_batch: int) -> List[_Timing]:
    """The previous server's worker: everything waiting (up to max_batch) as one generate() call."""
    from ..serving.step import left_pad

    waiting: "queue.Queue[int]" = queue.Queue()
    timings = [_Timing(0.0) for _ in specs]
    finished = threading.Event()

    def worker():
        served = 0
        while served < len(specs):
            batch = [waiting.get()]
            while len(batch) < max_batch:
                try:
                    batch.append(waiting.get_nowait())
                except queue.Empty:
                    break
            ids, mask = left_pad([specs[i].prompt for i in batch], 0, bank.device)
            step = [0]

            def on_token(tokens, active, batch=batch, step=step):
                now = time.perf_counter()
                for row in active.nonzero().flatten().tolist():
                    timing = timings[batch[row]]
                    timing.first = timing.first or now
                    timing.tokens += 1
                    if timing.tokens == specs[batch[row]].max_tokens:
                        timing.done = now
                step[0] += 1

            bank.generate(ids, mask, adapters=[specs[i].adapter for i in batch],
                          max_new_tokens=[specs[i].max_tokens for i in batch], on_token=on_token)
            served += len(batch)
        finished.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        timings[i].arrival = time.perf_counter()
        waiting.put(i)
    finished.wait(600)
    return timings


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(timings: List[_Timing]) -> Dict[str, float]:
    ttft = [t.first - t.arrival for t in timings]
    tpot = [(t.done - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]
    makespan = max(t.done for t in timings) - min(t.arrival for t in timings)
    return {"seconds": makespan, "tokens_per_s": sum(t.tokens for t in timings) / makespan,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * statistics.median(tpot), "tpot_p99_ms": 1e3 * _percentile(tpot, 0.99)}


_SATURATED_RATE: Dict[tuple, float] = {}  # today's requests/s at saturation, per workload (the poisson case's scale)


def measure(case: Case, device, providers: Optional[Sequence[str]], timing: Timing) -> List[Record]:
    device = torch.device(device)
    bank = _bank(case, device)
    specs = _workload(case)
    names = [p for p in PROVIDERS if providers is None or p in providers]
    workload_key = (case.requests, case.adapters, case.max_batch, case.hidden, case.layers, case.max_new, case.seed)
    if case.kind == "saturation":
        arrivals = [0.0] * len(specs)
    else:
        rate = _SATURATED_RATE.get(workload_key)
        if rate is None:  # measure it (the saturation case, when it ran first, already did)
            rate = len(specs) / _summary(_run_today(bank, specs, [0.0] * len(specs), case.max_batch))["seconds"]
        rng = random.Random(case.seed + 1)
        gaps = [rng.expovariate(case.load * rate) for _ in specs]
        arrivals = [sum(gaps[:i]) for i in range(len(specs))]
    _run_engine(bank, specs[:4], [0.0] * 4, "continuous", case.max_batch)  # warm-up
    results = {}
    for name in names:  # interleaving would not help: each run is seconds long and sees the whole load
        if name == "today":
            timings = _run_today(bank, specs, arrivals, case.max_batch)
        else:
            timings = _run_engine(bank, specs, arrivals, name, case.max_batch)
        results[name] = _summary(timings)
    if case.kind == "saturation" and "today" in results:
        _SATURATED_RATE[workload_key] = len(specs) / results["today"]["seconds"]
    return [Record(bench=BENCH, provider=name, device=device_name(device), commit=git_commit(),
                   config={"name": case.name, **asdict(case), **summary}, ms=1e3 * summary["seconds"],
                   tflops=0.0, gbps=0.0, peak_mem_mb=None) for name, summary in results.items()]


def goals(records: Sequence[Record]) -> List[str]:
    """Continuous batching's p99 time to first token <= 0.5x static's at the same arrivals; its tokens/s at
    saturation >= 0.9x today's server's."""
    by: Dict[str, Dict[str, Record]] = {}
    for r in records:
        by.setdefault(r.config["kind"], {})[r.provider] = r
    lines = []
    poisson = by.get("poisson", {})
    for other in ("static", "today"):
        if {"continuous", other} <= set(poisson):
            ratio = poisson["continuous"].config["ttft_p99_ms"] / poisson[other].config["ttft_p99_ms"]
            lines.append(f"p99 time to first token, continuous vs {other}: {poisson['continuous'].config['ttft_p99_ms']:.0f}"
                         f" vs {poisson[other].config['ttft_p99_ms']:.0f} ms = {ratio:.2f}x (goal <= 0.5x: "
                         f"{'met' if ratio <= 0.5 else 'NOT met'})")
    saturation = by.get("saturation", {})
    if {"continuous", "today"} <= set(saturation):
        ratio = saturation["continuous"].config["tokens_per_s"] / saturation["today"].config["tokens_per_s"]
        lines.append(f"tokens/s at saturation, continuous vs today's server: {ratio:.2f}x (goal >= 0.9x: "
                     f"{'met' if ratio >= 0.9 else 'NOT met'})")
    return lines
