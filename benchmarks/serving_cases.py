"""Serving benchmark: many prompt adapters in one batch vs the bare model and vs PEFT.

``python -m benchmarks.serving_cases [--suite serve-cpu] [--out DIR]`` times, for batches whose rows
use 1, 8 or 64 distinct prompt adapters (greedy, same requests for every provider):

- ``bank``: ``PromptBank.generate`` (one batch, prefixes from the bank, text-only KV cache);
- ``bare``: the model without prompts, Hugging Face ``generate`` at the same batch (the floor);
- ``peft_generate``: PEFT as users serve it, one adapter at a time with its own ``generate()`` (its
  tokens are checked against the correct ones and the mismatch count is recorded);
- ``peft_loop``: the correct PEFT baseline, a greedy loop over PEFT's forward, adapter by adapter.

Records: tokens/s, and for ``bank``/``bare`` the p50/p99 time per generated token (per decode step).
``bank`` and ``bare`` (the ratio the goals are about) run ``rounds`` times each, interleaved and in
alternating order, so that a slow phase of a shared machine hits both alike; their tokens/s is the
median over rounds and the per-token latencies pool every round. The PEFT baselines, an order of
magnitude slower, run once.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.harness import Record, device_name, git_commit


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


SUITES = {"serve-cpu": [Case(1), Case(8), Case(64)],
          "serve-cpu-quick": [Case(2, B=4, prompt_len=8, new_tokens=4, k=4, hidden=64, layers=2, vocab=100, rounds=2)],
          "serve-gpu": [Case(1, hidden=2048, layers=16, vocab=32000, dtype="bfloat16", new_tokens=32),
                        Case(8, hidden=2048, layers=16, vocab=32000, dtype="bfloat16", new_tokens=32),
                        Case(64, hidden=2048, layers=16, vocab=32000, dtype="bfloat16", new_tokens=32)]}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="serve-gpu" if torch.cuda.is_available() else "serve-cpu",
                        choices=sorted(SUITES))
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.suite.startswith("serve-gpu") else "cpu")
    records = []
    for case in SUITES[args.suite]:
        results = run_case(case, device)
        for provider, summary in results.items():
            records.append(Record(bench="serving", provider=provider, device=device_name(device), commit=git_commit(),
                                  config={"name": case.name, **asdict(case), **summary},
                                  ms=1e3 * summary["seconds"], tflops=0.0, gbps=0.0, peak_mem_mb=None))
        bank, bare = results["bank"]["tokens_per_s"], results["bare"]["tokens_per_s"]
        print(f"{case.name}: tokens/s bank {bank:.0f}, bare {bare:.0f} ({bank / bare:.2f}x), "
              f"PEFT generate {results['peft_generate']['tokens_per_s']:.0f} "
              f"({results['peft_generate']['wrong_rows']} rows wrong), PEFT loop "
              f"{results['peft_loop']['tokens_per_s']:.0f} ({bank / results['peft_loop']['tokens_per_s']:.1f}x); "
              f"bank p50/p99 {results['bank'].get('p50_ms_per_token', 0):.1f}/"
              f"{results['bank'].get('p99_ms_per_token', 0):.1f} ms per token; bank rows wrong: "
              f"{results['bank']['wrong_rows']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.suite}.json"
    path.write_text(json.dumps([asdict(r) for r in records], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
