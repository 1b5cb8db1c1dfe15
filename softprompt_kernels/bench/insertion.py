"""Cases, providers and suites of the prompt-insertion benchmark (the layer-0 input of an encoder).

Providers of a case:

- ``torch``: what PEFT does: ``cat([prompt.expand(B, -1, -1), embedding(input_ids)], dim=1)`` (an intermediate
  embedding tensor, then a concatenation copy);
- ``cpu`` / ``cuda``: ``softprompt_kernels.insert_prompt(..., backend=...)``, the fused kernel (one pass, every
  output row written straight from its source), with the API's default id validation included.

``fwd_bwd`` adds the prompt gradient (the weight is frozen, as in prompt tuning).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..ops import insert_prompt
from ..ops.backends import available_backends, get_backend
from ..ops.insert_prompt import validate
from ..ops.insert_prompt.reference import insert_prompt_reference
from .harness import CaseSetup, Suite, Timing, timed_call

BENCH = "insert_prompt"
CASE_KEY = "B = rows, n = tokens per row, k = prompt length, d = hidden size; fwd = forward, fwd_bwd = with backward"
_SHORT_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}


@dataclass(frozen=True)
class Case:
    B: int
    n: int  # tokens per row
    k: int  # prompt length
    d: int  # hidden size
    V: int = 30522  # BERT's vocabulary
    dtype: str = "float32"
    mode: str = "fwd"  # "fwd" | "fwd_bwd"

    @property
    def name(self) -> str:
        return f"B{self.B} n{self.n} k{self.k} d{self.d} {_SHORT_DTYPE.get(self.dtype, self.dtype)} {self.mode}"

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def moved_bytes(case: Case) -> float:
    """Embedding rows and prompt read, output written; backward reads the prompt rows of d_out, writes d_prompt."""
    elems = case.B * case.n * case.d + case.k * case.d + case.B * (case.k + case.n) * case.d
    if case.mode == "fwd_bwd":
        elems += case.B * case.k * case.d + case.k * case.d
    return elems * torch.empty((), dtype=getattr(torch, case.dtype)).element_size()


def build(case: Case, device, only: Optional[Sequence[str]] = None) -> CaseSetup:
    device = torch.device(device)
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, case.V, (case.B, case.n), generator=gen, device=device)
    weight = torch.randn(case.V, case.d, generator=gen, device=device, dtype=dtype)
    prompt = torch.randn(case.k, case.d, generator=gen, device=device).requires_grad_(case.mode == "fwd_bwd")
    d_out = torch.randn(case.B, case.k + case.n, case.d, generator=gen, device=device, dtype=dtype)
    providers: Dict[str, Callable[[], Any]] = {}
    skipped: Dict[str, str] = {}
    inputs = validate(input_ids=ids, weight=weight, prompt=prompt)
    for name in known_providers():
        if only is not None and name not in only:
            continue
        reasons = get_backend(name, "insert_prompt").not_supported_reasons(inputs)
        if reasons:
            skipped[name] = "; ".join(reasons)
        elif name == "torch":  # the PEFT path itself, without the API's validation
            providers[name] = timed_call(lambda: insert_prompt_reference(ids, weight, prompt), (prompt,), d_out,
                                         case.mode)
        else:
            fused = (lambda name=name: insert_prompt(ids, weight, prompt, backend=name))
            providers[name] = timed_call(fused, (prompt,), d_out, case.mode)
    return CaseSetup(config=case.config(), flops=0.0, bytes=moved_bytes(case), providers=providers, skipped=skipped)


def known_providers() -> List[str]:
    return available_backends("insert_prompt")


def _both(case: Case) -> List[Case]:
    return [case, replace(case, mode="fwd_bwd")]


_BERT = Case(B=16, n=128, k=100, d=768)  # BERT-base with a 100-token prompt

SUITES: Dict[str, Suite] = {
    "insertion-cpu": Suite("insertion-cpu", "cpu",
                           [*_both(_BERT), *_both(replace(_BERT, dtype="bfloat16")),
                            *_both(replace(_BERT, B=64, n=256, k=20))],
                           Timing(reps=30, warmup=3, min_time_s=2.0)),
    "insertion-cpu-quick": Suite("insertion-cpu-quick", "cpu", _both(Case(B=2, n=16, k=8, d=64, V=100)),
                                 Timing(reps=10, warmup=2, min_time_s=0.05)),
    "insertion-gpu": Suite("insertion-gpu", "cuda",
                           [*_both(replace(_BERT, B=64, n=512, dtype="bfloat16")),
                            *_both(replace(_BERT, B=64, n=512, d=1024, dtype="bfloat16"))],
                           Timing(reps=5, min_time_s=0.5)),
}
