"""Cases, providers, FLOP counts and suites of the ``prefix_attention`` benchmark.

Providers of a case:

- ``torch``: ``prefix_attention(..., backend="torch")``, the PEFT path (expand the prefix over
  the batch, concatenate it to k/v, repeat kv heads, masked SDPA), all inside the timed call;
- ``sdpa_concat``: SDPA on k/v that are already concatenated with each row's prefix and
  repeated to Hq heads, with a precomputed mask: the copy-free lower bound a fused kernel
  must at least match (its preparation is outside the timed call);
- one per fused backend of ``softprompt_kernels.available_backends()`` that accepts the inputs.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import softprompt_kernels
from .harness import CaseSetup, Suite, Timing, timed_call

BENCH = "prefix_attention"
CASE_KEY = ("B = rows, H = q/kv heads, L = query/key length, K = prefix slots, D = head dim, dtype, mask, "
            "W = sliding window, P = prompts in the bank; fwd = forward, fwd_bwd = forward + backward")
BASE_PROVIDERS = ("torch", "sdpa_concat")
MODES = ("fwd", "fwd_bwd")
_SHORT_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}


@dataclass(frozen=True)
class Case:
    """One problem size. ``Lq = 1`` with a long ``Lk`` is a decode step."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    K: int
    D: int
    dtype: str = "float32"
    causal: bool = True
    num_prompts: int = 1
    mode: str = "fwd"
    window: Optional[int] = None
    softcap: Optional[float] = None

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        features = (f" W{self.window}" if self.window else "") + (f" cap{self.softcap:g}" if self.softcap else "")
        return (f"B{self.B} H{self.Hq}/{self.Hkv} L{self.Lq}/{self.Lk} K{self.K} D{self.D} "
                f"{_SHORT_DTYPE.get(self.dtype, self.dtype)} {mask}{features} P{self.num_prompts} {self.mode}")

    def features(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in ("window", "softcap") if getattr(self, name) is not None}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def both_modes(case: Case) -> List[Case]:
    return [replace(case, mode=mode) for mode in MODES]


# --- counts

def visible_sequence_keys(Lq: int, Lk: int, causal: bool, window: Optional[int] = None) -> int:
    """Sequence keys seen, summed over the Lq queries: query i (index i + Lk - Lq) sees j <= its index
    when causal, and only j > its index - window with a sliding window."""
    offset = Lk - Lq  # bottom-right alignment
    total = 0
    for i in range(Lq):
        hi = min(Lk, i + offset + 1) if causal else Lk
        lo = max(0, i + offset - window + 1) if window else 0
        total += max(0, hi - lo)
    return total


def visible_prefix_slots(Lq: int, Lk: int, K: int, window: Optional[int] = None) -> int:
    """Prefix slots seen, summed over queries: all K, or with a window those at index s - K within reach."""
    if not window:
        return Lq * K
    return sum(min(K, max(0, window - 1 - (i + Lk - Lq))) for i in range(Lq))


def forward_flops(case: Case) -> float:
    """``4 * B * Hq * D * sum over queries of visible keys`` (prefix slots and sequence keys): two matmuls
    (QK^T and PV) of 2 FLOPs per multiply-add; masked keys do not count (docs/DESIGN.md section 7)."""
    keys = (visible_prefix_slots(case.Lq, case.Lk, case.K, case.window)
            + visible_sequence_keys(case.Lq, case.Lk, case.causal, case.window))
    return 4.0 * case.B * case.Hq * case.D * keys


def flops(case: Case) -> float:
    """Forward, or forward + backward (backward = 2.5x forward)."""
    return forward_flops(case) * (3.5 if case.mode == "fwd_bwd" else 1.0)


def moved_bytes(case: Case) -> float:
    """Approximate minimum memory traffic: q, k, v, the prefix bank and out each moved once;
    with backward also d_out read and the five gradients written (so twice that). The
    bank counts once, unexpanded: copies a provider makes count against it, not here."""
    elems = (2 * case.B * case.Hq * case.Lq * case.D  # q and out
             + 2 * case.B * case.Hkv * case.Lk * case.D  # k and v
             + 2 * case.num_prompts * case.Hkv * case.K * case.D)  # prefix_k and prefix_v
    per_elem = torch.empty((), dtype=case.torch_dtype).element_size()
    return elems * per_elem * (2.0 if case.mode == "fwd_bwd" else 1.0)


# --- inputs

def make_inputs(case: Case, device, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """Seeded random q, k, v, prefix_k, prefix_v, prompt_ids, d_out for one case."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=case.torch_dtype)

    P = case.num_prompts
    return {
        "q": randn(case.B, case.Hq, case.Lq, case.D),
        "k": randn(case.B, case.Hkv, case.Lk, case.D),
        "v": randn(case.B, case.Hkv, case.Lk, case.D),
        "prefix_k": randn(P, case.Hkv, case.K, case.D),
        "prefix_v": randn(P, case.Hkv, case.K, case.D),
        "prompt_ids": torch.arange(case.B, device=device) % P if P > 1 else None,
        "d_out": randn(case.B, case.Hq, case.Lq, case.D),
    }


def concatenated_inputs(case: Case, inputs: Dict[str, Optional[torch.Tensor]]):
    """What ``sdpa_concat`` gets for free: k/v [B, Hq, K + Lk, D] with each row's prefix in front
    and kv heads repeated, and a bool mask [B, 1, Lq, K + Lk] (True = visible)."""
    k, device = inputs["k"], inputs["k"].device
    ids = inputs["prompt_ids"]
    rows = ids if ids is not None else torch.zeros(case.B, dtype=torch.long, device=device)
    group = case.Hq // case.Hkv
    keys = torch.cat([inputs["prefix_k"].index_select(0, rows), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([inputs["prefix_v"].index_select(0, rows), inputs["v"]], dim=2)
    values = values.repeat_interleave(group, dim=1)
    seq = torch.ones(case.Lq, case.Lk, dtype=torch.bool, device=device)
    if case.causal:
        seq = torch.tril(seq, diagonal=case.Lk - case.Lq)
    query_index = torch.arange(case.Lq, device=device)[:, None] + (case.Lk - case.Lq)
    if case.window:
        seq = seq & (query_index - torch.arange(case.Lk, device=device)[None, :] < case.window)
    prefix = torch.ones(case.Lq, case.K, dtype=torch.bool, device=device)
    if case.window:
        prefix = query_index - (torch.arange(case.K, device=device)[None, :] - case.K) < case.window
    mask = torch.cat([prefix, seq], dim=1).expand(case.B, 1, -1, -1).contiguous()
    return keys, values, mask


# --- providers

def _leaves(tensors: Iterable[torch.Tensor], mode: str) -> Tuple[torch.Tensor, ...]:
    if mode == "fwd":
        return tuple(tensors)
    return tuple(t.detach().requires_grad_() for t in tensors)


def _op_provider(case: Case, inputs, backend: str, leaves) -> Callable[[], Any]:
    q, k, v, pk, pv = leaves
    ids = inputs["prompt_ids"]

    def forward():
        return softprompt_kernels.prefix_attention(q, k, v, pk, pv, prompt_ids=ids, causal=case.causal,
                                                   backend=backend, **case.features())
    return timed_call(forward, leaves, inputs["d_out"], case.mode)


def _sdpa_concat_provider(case: Case, inputs) -> Callable[[], Any]:
    keys, values, mask = concatenated_inputs(case, inputs)
    leaves = _leaves((inputs["q"], keys, values), case.mode)
    q, keys, values = leaves
    scale = case.D ** -0.5

    def forward():
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return timed_call(forward, leaves, inputs["d_out"], case.mode)


def fused_backends(case: Case, inputs) -> Tuple[List[str], Dict[str, str]]:
    """Fused backends that accept these inputs, and why the others refuse."""
    accepted, refused = [], {}
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    for name in softprompt_kernels.available_backends():
        if name == "torch":
            continue
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            # The interpreter is a correctness tool (tests set it); its times mean nothing.
            refused[name] = "not timed under TRITON_INTERPRET=1 (Triton's CPU interpreter)"
            continue
        reasons = softprompt_kernels.not_supported_reasons(name, *args, prompt_ids=inputs["prompt_ids"],
                                                           causal=case.causal, **case.features())
        if reasons:
            refused[name] = "; ".join(reasons)
        else:
            accepted.append(name)
    return accepted, refused


def build(case: Case, device, only: Optional[Sequence[str]] = None) -> CaseSetup:
    """Inputs built once for the case, captured by one callable per provider (``only`` filters)."""
    wanted = (lambda name: only is None or name in only)
    inputs = make_inputs(case, device)
    fused, refused = fused_backends(case, inputs)
    op_leaves = _leaves([inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")], case.mode)
    providers: Dict[str, Callable[[], Any]] = {}
    if wanted("torch"):
        providers["torch"] = _op_provider(case, inputs, "torch", op_leaves)
    if wanted("sdpa_concat") and case.softcap is None:  # SDPA cannot soft-cap
        providers["sdpa_concat"] = _sdpa_concat_provider(case, inputs)
    for name in fused:
        if wanted(name):
            providers[name] = _op_provider(case, inputs, name, op_leaves)
    skipped = {name: why for name, why in refused.items() if wanted(name)}
    return CaseSetup(config=case.config(), flops=flops(case), bytes=moved_bytes(case), providers=providers,
                     skipped=skipped)


def known_providers() -> List[str]:
    return list(BASE_PROVIDERS) + [n for n in softprompt_kernels.available_backends() if n != "torch"]


# --- suites

def _cpu_quick() -> List[Case]:
    tiny = Case(B=2, Hq=4, Hkv=2, Lq=32, Lk=32, K=8, D=16)
    return [*both_modes(tiny),
            replace(tiny, Lq=1, Lk=64),  # decode
            replace(tiny, B=4, num_prompts=2, mode="fwd_bwd")]


def _cpu() -> List[Case]:
    accept = Case(B=16, Hq=8, Hkv=4, Lq=128, Lk=128, K=100, D=32)  # the acceptance case
    return [*both_modes(accept),
            replace(accept, Lq=1, Lk=512),  # decode step over a long cache
            *both_modes(replace(accept, num_prompts=8)),
            *both_modes(replace(accept, dtype="bfloat16"))]


def _gpu() -> List[Case]:
    base = Case(B=8, Hq=32, Hkv=8, Lq=512, Lk=512, K=16, D=128, dtype="bfloat16")
    cases = [c for L in (512, 2048, 8192) for K in (16, 128, 512)
             for c in both_modes(replace(base, Lq=L, Lk=L, K=K))]
    cases += both_modes(replace(base, Lq=2048, Lk=2048, K=128, D=64))
    cases += both_modes(replace(base, B=32, Lq=512, Lk=512, K=128, num_prompts=32))
    cases.append(replace(base, Lq=1, Lk=8192, K=128))  # decode
    return cases


def _prefill_gpu() -> List[Case]:
    """Forward only: the CUDA prefill kernel beside Triton (and the PEFT path, SDPA on concatenated K/V)."""
    base = Case(B=8, Hq=32, Hkv=8, Lq=2048, Lk=2048, K=128, D=128, dtype="bfloat16")
    return [replace(base, Lq=L, Lk=L) for L in (512, 2048, 8192)] + [replace(base, D=64), replace(base, causal=False)]


def _window_cases(B: int, Hq: int, Hkv: int, D: int, dtype: str, lengths: Sequence[int], window: int) -> List[Case]:
    base = Case(B=B, Hq=Hq, Hkv=Hkv, Lq=lengths[0], Lk=lengths[0], K=16, D=D, dtype=dtype, mode="fwd_bwd")
    return [replace(base, Lq=L, Lk=L, window=w) for L in lengths for w in (None, window)]


def window_goals(records) -> List[str]:
    """With a sliding window W a fused backend's time grows like L * W (exponent of L about 1; causal attention
    without a window grows like L^2), per fused provider and pair of lengths; the baselines mask, so they stay
    quadratic."""
    import math

    by = {}
    for r in records:
        c = r.config
        if c.get("mode") == "fwd_bwd" and r.provider not in BASE_PROVIDERS:
            by[(r.provider, c["Lq"], c.get("window"))] = r.ms
    lines = []
    for provider in sorted({p for p, _, _ in by}):
        lengths = sorted({L for p, L, _ in by if p == provider})
        windows = sorted({w for p, _, w in by if p == provider and w})
        for w in windows:
            for short, long in zip(lengths, lengths[1:]):
                if (provider, long, w) not in by or (provider, short, w) not in by:
                    continue
                with_w = by[(provider, long, w)] / by[(provider, short, w)]
                exponent = math.log(with_w) / math.log(long / short)
                without = (f", x{by[(provider, long, None)] / by[(provider, short, None)]:.2f} without"
                           if (provider, long, None) in by and (provider, short, None) in by else "")
                lines.append(f"{provider} L {short} -> {long}: time x{with_w:.2f} with window {w}{without}; "
                             f"L^{exponent:.2f} (goal: grows like L*W, exponent <= 1.25: "
                             f"{'met' if exponent <= 1.25 else 'NOT met'})")
    return lines


def goals(records) -> List[str]:
    """The CUDA prefill goal (docs/DESIGN.md section 7: CUDA forward within 1.25x of the Triton forward), per case,
    and the window scaling of the window suites."""
    if any(r.config.get("window") for r in records):
        return window_goals(records)
    by_case: Dict[str, Dict[str, Any]] = {}
    for r in records:
        by_case.setdefault(r.config.get("name"), {})[r.provider] = r
    lines = []
    for name, recs in by_case.items():
        if "cuda" in recs and "triton" in recs and recs["cuda"].config.get("mode") == "fwd":
            ratio = recs["cuda"].ms / recs["triton"].ms
            lines.append(f"{name}: cuda / triton forward time = {ratio:.2f}x "
                         f"(goal <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'})")
    return lines


def _gpu_quick() -> List[Case]:
    return both_modes(Case(B=4, Hq=16, Hkv=4, Lq=256, Lk=256, K=64, D=128, dtype="bfloat16"))


SUITES: Dict[str, Suite] = {
    "cpu-quick": Suite("cpu-quick", "cpu", _cpu_quick(), Timing(reps=10, warmup=2, min_time_s=0.05)),
    "cpu": Suite("cpu", "cpu", _cpu(), Timing(reps=30, warmup=3, min_time_s=3.0)),
    "gpu": Suite("gpu", "cuda", _gpu(), Timing(reps=5, min_time_s=0.5)),
    "gpu-quick": Suite("gpu-quick", "cuda", _gpu_quick(), Timing(reps=3, min_time_s=0.1)),
    "prefill-gpu": Suite("prefill-gpu", "cuda", _prefill_gpu(), Timing(reps=5, min_time_s=0.3)),
    # sliding windows: the fused paths skip what lies outside the window (cost ~ L * W, not L^2)
    "window-cpu": Suite("window-cpu", "cpu", _window_cases(2, 4, 2, 32, "float32", (512, 1024, 2048), 128),
                        Timing(reps=5, warmup=1, min_time_s=2.0)),
    "window-gpu": Suite("window-gpu", "cuda", _window_cases(4, 32, 8, 128, "bfloat16", (2048, 8192, 16384), 1024),
                        Timing(reps=5, min_time_s=0.5)),
}
