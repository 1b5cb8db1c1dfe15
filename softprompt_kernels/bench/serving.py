"""Serving benchmark: many prompt adapters in one batch vs the bare model and vs PEFT.

``softprompt-kernels bench --suite serve-cpu`` times, for batches whose rows use 1, 8 or 64 distinct
prompt adapters (greedy, same requests for every provider):

- ``bank``: ``PromptBank.generate`` (one batch, prefixes from the bank, text-only KV cache);
- ``bare``: the model without prompts, Hugging Face ``generate`` at the same batch (the floor);
- ``peft_generate``: PEFT as users serve it, one adapter at a time with its own ``generate()`` (its
  tokens are checked against the correct ones and the mismatch count is recorded);
- ``peft_loop``: the correct PEFT baseline, a greedy loop over PEFT's forward, adapter by adapter.

Records (``ms`` = one whole batch generation): tokens/s, and for ``bank``/``bare`` the p50/p99 time per
generated token (per decode step), in the config.
``bank`` and ``bare`` (the ratio the goals are about) run ``rounds`` times each, interleaved and in
alternating order, so that a slow phase of a shared machine hits both alike; their tokens/s is the
median over rounds and the per-token latencies pool every round. The PEFT baselines, an order of
magnitude slower, run once.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .harness import Record, Suite, Timing, device_name, git_commit

BENCH = "serving"
PROVIDERS = ("bank", "bare", "peft_loop", "peft_generate")
CASE_KEY = ("adapters = distinct prompt adapters in the batch, B = requests, prompt = tokens per request, "
            "+N = new tokens per request, k = virtual tokens per adapter")


@dataclass(frozen=True)
class Case:
    adapters: int
    B: int = 64
    prompt_len: int = 32
    new_tokens: int = 16
    k: int = 16
    hidden: int = 256
    layers: int = 4
    vocab: int = 1000
    dtype: str = "float32"
    rounds: int = 5  # interleaved timed runs of bank and bare

    @property
    def name(self) -> str:
        return f"{self.adapters} adapters, B{self.B}, prompt {self.prompt_len}, +{self.new_tokens} tokens, k{self.k}"


_GPU = dict(hidden=2048, layers=16, vocab=32000, dtype="bfloat16", new_tokens=32)
# Timing does not apply: each case sets its own interleaved rounds (Case.rounds).
SUITES = {
    "serve-cpu": Suite("serve-cpu", "cpu", [Case(1), Case(8), Case(64)], Timing()),
    "serve-cpu-quick": Suite("serve-cpu-quick", "cpu",
                             [Case(2, B=4, prompt_len=8, new_tokens=4, k=4, hidden=64, layers=2, vocab=100, rounds=2)],
                             Timing()),
    "serve-gpu": Suite("serve-gpu", "cuda", [Case(1, **_GPU), Case(8, **_GPU), Case(64, **_GPU)], Timing()),
}


def known_providers() -> List[str]:
    return list(PROVIDERS)


def _model(case: Case, device):
    import transformers

    config = transformers.LlamaConfig(hidden_size=case.hidden, intermediate_size=case.hidden * 11 // 4,
                                      num_hidden_layers=case.layers, num_attention_heads=8, num_key_value_heads=4,
                                      vocab_size=case.vocab, max_position_embeddings=512, pad_token_id=0,
                                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=getattr(torch, case.dtype)).eval()


def _peft(base, case: Case):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.k),
                           adapter_name="a0")
    for i in range(1, case.adapters):
        model.add_adapter(f"a{i}", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.k))
    with torch.no_grad():
        for i, p in enumerate(model.prompt_encoder.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    return model.eval()


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def _greedy_loop(forward, ids, steps):
    new = []
    for _ in range(steps):
        token = forward(ids).logits[:, -1].argmax(-1)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
    return torch.stack(new, 1)


@torch.no_grad()
def run_case(case: Case, device) -> Dict[str, dict]:
    import softprompt_kernels as sk

    base = _model(case, device)
    peft = _peft(base, case)
    bank = sk.PromptBank(copy.deepcopy(base), capacity=max(case.adapters, 1))
    for name in peft.peft_config:
        bank.add(name, peft.prompt_encoder[name].embedding.weight.detach(), kind="prompt")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, case.vocab, (case.B, case.prompt_len), generator=gen).to(device)
    names = [f"a{row % case.adapters}" for row in range(case.B)]
    results: Dict[str, dict] = {}

    def run_bank():
        steps: List[float] = []
        last = [time.perf_counter()]

        def on_token(tokens, active):
            now = time.perf_counter()
            steps.append(now - last[0])
            last[0] = now

        last[0] = time.perf_counter()
        tokens, seconds = _timed(lambda: bank.generate(ids, adapters=names, max_new_tokens=case.new_tokens,
                                                       on_token=on_token))
        return tokens, seconds, steps[1:]  # steps[0] includes the prefill

    def run_bare():
        steps: List[float] = []
        streamer = _StepTimer(steps)
        tokens, seconds = _timed(lambda: base.generate(ids, max_new_tokens=case.new_tokens,
                                                       min_new_tokens=case.new_tokens, do_sample=False,
                                                       pad_token_id=0, streamer=streamer))
        return tokens, seconds, steps[2:]  # the first put is the prompt, the second the prefill

    bank.generate(ids[:2], adapters=names[:2], max_new_tokens=2)  # warm-up
    base.generate(ids[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)
    runs: Dict[str, list] = {"bank": [], "bare": []}
    for round_index in range(case.rounds):
        order = ("bank", "bare") if round_index % 2 == 0 else ("bare", "bank")
        for provider in order:
            runs[provider].append((run_bank if provider == "bank" else run_bare)())
    for provider, provider_runs in runs.items():
        seconds = statistics.median(r[1] for r in provider_runs)
        results[provider] = _summary(case, seconds, [step for r in provider_runs for step in r[2]])
        results[provider]["rounds"] = len(provider_runs)
    bank_tokens = runs["bank"][0][0]
    if any(r[0] != bank_tokens for r in runs["bank"]):
        raise RuntimeError("PromptBank.generate gave different tokens in different rounds of the same greedy batch")

    correct, loop_seconds, wrong, gen_seconds = {}, 0.0, 0, 0.0
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        peft.set_adapter(name)
        tokens, s = _timed(lambda: _greedy_loop(lambda x: peft(input_ids=x), ids[rows], case.new_tokens))
        loop_seconds += s
        correct[name] = tokens
        out, s = _timed(lambda: peft.generate(input_ids=ids[rows], max_new_tokens=case.new_tokens,
                                               min_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0))
        gen_seconds += s
        wrong += int((out[:, -case.new_tokens:] != tokens).any(dim=1).sum())
    results["peft_loop"] = _summary(case, loop_seconds, [])
    results["peft_generate"] = dict(_summary(case, gen_seconds, []), wrong_rows=wrong)
    bank_wrong = sum(int(bank_tokens[i] != correct[n][[j for j, m in enumerate(names) if m == n].index(i)].tolist())
                     for i, n in enumerate(names))
    results["bank"]["wrong_rows"] = bank_wrong
    return results


class _StepTimer:
    """A generate() streamer that records the time between token steps."""

    def __init__(self, steps: List[float]):
        self.steps, self.last = steps, time.perf_counter()

    def put(self, value):
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now

    def end(self):
        pass


def _summary(case: Case, seconds: float, step_seconds: List[float]) -> dict:
    out = {"seconds": seconds, "tokens_per_s": case.B * case.new_tokens / seconds}
    if step_seconds:
        ordered = sorted(step_seconds)
        out["p50_ms_per_token"] = 1e3 * statistics.median(ordered)
        out["p99_ms_per_token"] = 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return out


def measure(case: Case, device, providers: Optional[Sequence[str]] = None, timing: Optional[Timing] = None
            ) -> List[Record]:
    """Runs one case; its records carry tokens/s and latencies in the config. Every provider runs (the
    bank's tokens are checked against the PEFT loop's), ``providers`` only filters the records."""
    device = torch.device(device)
    results = run_case(case, device)
    return [Record(bench=BENCH, provider=provider, device=device_name(device), commit=git_commit(),
                   config={"name": case.name, **asdict(case), **summary}, ms=1e3 * summary["seconds"],
                   tflops=0.0, gbps=0.0, peak_mem_mb=None)
            for provider, summary in results.items() if providers is None or provider in providers]


def goals(records: Sequence[Record]) -> List[str]:
    """Per case: tokens/s of the bank vs the bare model (goal >= 0.9x) and vs the PEFT loop (>= 5x),
    latencies, and rows whose tokens differ from the correct ones."""
    by_case: Dict[str, Dict[str, Record]] = {}
    for r in records:
        by_case.setdefault(r.config["name"], {})[r.provider] = r
    lines = []
    for name, recs in by_case.items():
        if "bank" not in recs:
            continue
        bank = recs["bank"].config
        parts = [f"bank {bank['tokens_per_s']:.0f} tokens/s"]
        if "bare" in recs:
            ratio = bank["tokens_per_s"] / recs["bare"].config["tokens_per_s"]
            parts.append(f"{ratio:.2f}x the bare model (goal >= 0.9x: {'met' if ratio >= 0.9 else 'NOT met'})")
        if "peft_loop" in recs:
            ratio = bank["tokens_per_s"] / recs["peft_loop"].config["tokens_per_s"]
            parts.append(f"{ratio:.1f}x the PEFT loop (goal >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
        if "p50_ms_per_token" in bank:
            parts.append(f"p50/p99 {bank['p50_ms_per_token']:.1f}/{bank['p99_ms_per_token']:.1f} ms per token")
        parts.append(f"bank rows wrong: {bank['wrong_rows']}")
        if "peft_generate" in recs:
            parts.append(f"PEFT generate() rows wrong: {recs['peft_generate'].config['wrong_rows']}")
        lines.append(f"{name}: " + "; ".join(parts))
    return lines
