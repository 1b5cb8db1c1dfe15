"""Decode benchmark of ``prefix_attention`` (the serving step): one query per row over the row's
prompt prefix (from a bank) and its KV cache.

Cases follow the decode goals (docs/DESIGN.md section 7): B in {1, 8, 64}, cache lengths {512, 4096, 32768}, K = 128 prefix
slots, Hq = 32, Hkv = 8, D = 128, bfloat16, with one shared prompt or 64 distinct prompts in the
bank (row b uses prompt b % 64). Providers: ``torch`` (the PEFT path), ``triton``, ``cuda``, each
through ``prefix_attention`` under ``no_grad``; plus a ``device_copy`` case that measures the copy
bandwidth of the device (``dst.copy_(src)`` of 2 GiB: read + write), the yardstick for GB/s.

GB/s counts the bytes a decode step must move once: the rows' cache K/V, the prompts they use
(each distinct prompt once), q and out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import softprompt_kernels
from .harness import CaseSetup, Record, Suite, Timing

BENCH = "prefix_attention_decode"
CASE_KEY = "B = rows, cache = cached keys per row, K = prefix slots, P = distinct prompts, D = head dim; one query per row"
PROVIDERS = ("torch", "triton", "cuda")
COPY_PROVIDER = "device_copy"
COPY_BYTES = 2 << 30


@dataclass(frozen=True)
class DecodeCase:
    B: int
    Lk: int
    num_prompts: int = 1
    K: int = 128
    Hq: int = 32
    Hkv: int = 8
    D: int = 128
    Lq: int = 1
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"decode B{self.B} cache{self.Lk} K{self.K} P{self.num_prompts} D{self.D}"

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class CopyCase:
    nbytes: int = COPY_BYTES

    @property
    def name(self) -> str:
        return f"device copy {self.nbytes >> 20} MiB"

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "nbytes": self.nbytes}


def distinct_prompts(case: DecodeCase) -> int:
    return min(case.B, case.num_prompts)


def moved_bytes(case: DecodeCase) -> float:
    elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    cache = 2 * case.B * case.Hkv * case.Lk * case.D
    prefix = 2 * distinct_prompts(case) * case.Hkv * case.K * case.D
    q_out = 2 * case.B * case.Hq * case.Lq * case.D
    return float((cache + prefix + q_out) * elem)


def forward_flops(case: DecodeCase) -> float:
    return 4.0 * case.B * case.Hq * case.Lq * (case.K + case.Lk) * case.D


def _decode_setup(case: DecodeCase, device, only: Optional[Sequence[str]]) -> CaseSetup:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    # the cache as transformers keeps it ([B, Hkv, L, D]); q as the attention layer hands it over
    q = randn(case.B, case.Lq, case.Hq, case.D).transpose(1, 2)
    k, v = randn(case.B, case.Hkv, case.Lk, case.D), randn(case.B, case.Hkv, case.Lk, case.D)
    pk, pv = randn(case.num_prompts, case.Hkv, case.K, case.D), randn(case.num_prompts, case.Hkv, case.K, case.D)
    ids = torch.arange(case.B, device=device) % case.num_prompts if case.num_prompts > 1 else None
    providers: Dict[str, Callable[[], Any]] = {}
    skipped: Dict[str, str] = {}
    for name in PROVIDERS:
        if only is not None and name not in only:
            continue
        reasons = (softprompt_kernels.not_supported_reasons(name, q, k, v, pk, pv, prompt_ids=ids)
                   if name in softprompt_kernels.available_backends() else
                   [softprompt_kernels.backend_status()[name] or "unavailable"])
        if reasons:
            skipped[name] = "; ".join(reasons)
            continue

        def run(backend=name):
            with torch.no_grad():
                return softprompt_kernels.prefix_attention(q, k, v, pk, pv, prompt_ids=ids, backend=backend)
        providers[name] = run
    return CaseSetup(config=case.config(), flops=forward_flops(case), bytes=moved_bytes(case),
                     providers=providers, skipped=skipped)


def _copy_setup(case: CopyCase, device) -> CaseSetup:
    src = torch.empty(case.nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return CaseSetup(config=case.config(), flops=0.0, bytes=2.0 * case.nbytes,
                     providers={COPY_PROVIDER: lambda: dst.copy_(src)})


def build(case, device, only: Optional[Sequence[str]] = None) -> CaseSetup:
    if isinstance(case, CopyCase):
        return _copy_setup(case, device)
    return _decode_setup(case, device, only)


def known_providers() -> List[str]:
    return list(PROVIDERS) + [COPY_PROVIDER]


def _decode_gpu() -> List[Any]:
    cases: List[Any] = [CopyCase()]
    for B in (1, 8, 64):
        for Lk in (512, 4096, 32768):
            for prompts in (1, 64):
                cases.append(DecodeCase(B=B, Lk=Lk, num_prompts=prompts))
    return cases


SUITES: Dict[str, Suite] = {
    "decode-gpu": Suite("decode-gpu", "cuda", _decode_gpu(), Timing(reps=5, min_time_s=0.3)),
    "decode-gpu-quick": Suite("decode-gpu-quick", "cuda",
                              [CopyCase(256 << 20), DecodeCase(B=8, Lk=4096), DecodeCase(B=8, Lk=4096, num_prompts=64)],
                              Timing(reps=3, min_time_s=0.1)),
}


def goals(records: Sequence[Record]) -> List[str]:
    """The CUDA decode goals (docs/DESIGN.md section 7), each as measured / met or not (lines for the log)."""
    by = {(r.config.get("name"), r.provider): r for r in records}
    copy = next((r for r in records if r.provider == COPY_PROVIDER), None)
    lines = []

    def rec(B, Lk, prompts, provider):
        return by.get((DecodeCase(B=B, Lk=Lk, num_prompts=prompts).name, provider))

    if copy is not None:
        for B in (1, 8, 64):
            r = rec(B, 32768, 1, "cuda")
            if r is not None:
                frac = r.gbps / copy.gbps
                lines.append(f"cuda decode B{B} cache 32768: {r.gbps:.0f} GB/s = {frac:.0%} of copy "
                             f"{copy.gbps:.0f} GB/s (goal >= 70%: {'met' if frac >= 0.7 else 'NOT met'})")
    for Lk in (512, 4096, 32768):
        one, many = rec(64, Lk, 1, "cuda"), rec(64, Lk, 64, "cuda")
        if one and many:
            ratio = many.ms / one.ms
            lines.append(f"cuda B64 cache {Lk}: 64 prompts / 1 prompt = {ratio:.2f}x time "
                         f"(goal <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'})")
    for prompts in (1, 64):
        t, c = rec(64, 4096, prompts, "torch"), rec(64, 4096, prompts, "cuda")
        if t and c:
            speedup = t.ms / c.ms
            lines.append(f"cuda vs torch B64 cache 4096 P{prompts}: {speedup:.2f}x "
                         f"(goal >= 3x: {'met' if speedup >= 3 else 'NOT met'})")
    return lines
