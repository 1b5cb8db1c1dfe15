"""Shared builders for prefix-attention tests: cases, tensors, comparisons."""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import softprompt_kernels as sk
from oracle import oracle_prefix_attention
from softprompt_kernels.ops.prefix_attention.contract import BACKWARD_LEADING, BACKWARD_TRAILING, CONTRACT

TENSOR_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass
class Case:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    P: int
    K: int
    D: int
    causal: bool = True
    prompt_ids: Optional[List[int]] = None
    prefix_lens: Optional[List[int]] = None
    padding: Optional[List[List[int]]] = None  # per row: 1 = real token, 0 = padding (length Lk)
    seed: int = 0
    name: str = field(default="")
    window: Optional[int] = None
    softcap: Optional[float] = None
    sinks: bool = False  # one seeded sink logit per q head (a differentiable input)
    prefix_offsets: Optional[List[int]] = None  # per row: the prefix sits before this key (with a window)

    def __str__(self):
        return self.name or (f"B{self.B}-H{self.Hq}/{self.Hkv}-Lq{self.Lq}-Lk{self.Lk}-P{self.P}-K{self.K}"
                             f"-D{self.D}-{'causal' if self.causal else 'full'}")


def make_inputs(case: Case, dtype=torch.float32, device="cpu", requires_grad=True):
    """Returns (tensors [q, k, v, prefix_k, prefix_v], kwargs) for prefix_attention."""
    gen = torch.Generator().manual_seed(case.seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    tensors = [rand(case.B, case.Hq, case.Lq, case.D), rand(case.B, case.Hkv, case.Lk, case.D),
               rand(case.B, case.Hkv, case.Lk, case.D), rand(case.P, case.Hkv, case.K, case.D),
               rand(case.P, case.Hkv, case.K, case.D)]
    kwargs = {"causal": case.causal}
    if case.prompt_ids is not None:
        kwargs["prompt_ids"] = torch.tensor(case.prompt_ids, dtype=torch.long, device=device)
    if case.prefix_lens is not None:
        kwargs["prefix_lens"] = torch.tensor(case.prefix_lens, dtype=torch.long, device=device)
    if case.padding is not None:
        kwargs["key_padding_mask"] = torch.tensor(case.padding, dtype=torch.bool, device=device)
    if case.window is not None:
        kwargs["window"] = case.window
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    if case.sinks:
        kwargs["sinks"] = rand(case.Hq)
    if case.prefix_offsets is not None:
        kwargs["prefix_offsets"] = torch.tensor(case.prefix_offsets, dtype=torch.long, device=device)
    return tensors, kwargs


def forward_op_args(tensors, **named):
    """The compiled forward ops' positional arguments (their order is the contract's) from the five tensors and
    the other arguments by name; scale defaults to 0.5."""
    named.setdefault("scale", 0.5)
    return CONTRACT.positional({**dict(zip(TENSOR_NAMES, tensors)), **named})


def backward_op_args(extra=(), **named):
    """The compiled backward ops' positional arguments from every argument by name (grad_out, out, lse, the
    forward's arguments, ...); ``extra``: a backend's own trailing arguments (Triton's ``deterministic``)."""
    return CONTRACT.positional(named, BACKWARD_LEADING, (*BACKWARD_TRAILING, *extra))


def backward_op_named(args, kwargs=None):
    """A backward op call's arguments by name (as a dispatch mode sees the call)."""
    return CONTRACT.named(args, kwargs, BACKWARD_LEADING, BACKWARD_TRAILING)


def upstream_grad(shape, seed=123, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def run_with_grads(fn, tensors, kwargs, use_lse=True):
    """Runs fn(*tensors, **kwargs, return_lse=True); returns [out, lse, dq, dk, dv, dprefix_k, dprefix_v]
    and, when kwargs holds sinks, their gradient last.

    The loss uses the output and (finite part of) the lse, so the lse gradient path is covered too.
    """
    out, lse = fn(*tensors, **kwargs, return_lse=True)
    loss = (out.double() * upstream_grad(out.shape, device=out.device)).sum()
    if use_lse:
        finite = torch.isfinite(lse)
        weights = upstream_grad(lse.shape, seed=7, device=lse.device)
        loss = loss + (torch.where(finite, lse.double(), torch.zeros_like(lse.double())) * weights).sum()
    leaves = list(tensors) + ([kwargs["sinks"]] if kwargs.get("sinks") is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return [out.detach(), lse.detach()] + [g.detach() for g in grads]


NAMES = ["out", "lse", "grad_q", "grad_k", "grad_v", "grad_prefix_k", "grad_prefix_v", "grad_sinks"]


def oracle_results(case: Case):
    tensors, kwargs = make_inputs(case, dtype=torch.float64)
    return run_with_grads(oracle_prefix_attention, tensors, kwargs)


_ORACLE_CACHE: dict = {}


def cached_oracle_results(case: Case):
    """``oracle_results`` computed once per case for the session (cases are compared on several backends and
    dtypes; the float64 oracle is the slow part). Keyed by the case's repr: every field counts."""
    key = repr(case)
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE[key] = oracle_results(case)
    return _ORACLE_CACHE[key]


def backend_results(case: Case, backend: str, dtype=torch.float32, device="cpu"):
    tensors, kwargs = make_inputs(case, dtype=dtype, device=device)
    return run_with_grads(lambda *a, **kw: sk.prefix_attention(*a, **kw, backend=backend), tensors, kwargs)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| over finite entries; -inf must match exactly."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    inf_expected = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), inf_expected), "infinite entries differ"
    assert not torch.isnan(actual).any(), "NaN in result"
    a, e = actual[~inf_expected], expected[~inf_expected]
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def assert_matches_oracle(results, reference, rtol):
    assert len(results) == len(reference)
    for name, actual, expected in zip(NAMES, results, reference):
        err = max_relative_error(actual, expected)
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


FLASH_FLOOR = 1e-3  # the rule's floor, relative to max(max|ref|, 1)


def assert_flash_rule(name: str, ours: torch.Tensor, torch_same_dtype: torch.Tensor, reference: torch.Tensor):
    """FlashAttention's tolerance rule (docs/DESIGN.md section 6), the one copy every test uses:

    ``max|ours - ref| <= 2 * max|torch_same_dtype - ref| + FLASH_FLOOR * max(max|ref|, 1)``, with ``ref`` computed
    in higher precision. Non-finite reference entries (lse -inf) must be non-finite in ``ours`` too and are left out.
    """
    reference = reference.double()
    finite = torch.isfinite(reference)
    assert torch.equal(torch.isfinite(ours.double()), finite), f"{name}: finite entries differ from the reference"
    if not finite.any():
        return
    ref = reference[finite]
    ours_err = (ours.double()[finite] - ref).abs().max().item()
    base_err = (torch_same_dtype.double()[finite] - ref).abs().max().item()
    floor = FLASH_FLOOR * max(ref.abs().max().item(), 1.0)
    assert ours_err <= 2 * base_err + floor, f"{name}: {ours_err:.3e} > 2 * {base_err:.3e} (torch) + {floor:.1e}"


def gpu_inputs(shape, dtype, seed=0, requires_grad=False):
    """CUDA inputs of a GPU test case ``(B, Hq, Hkv, Lq, Lk, P, K, D, causal, padded, multi_prompt)``:
    q/k/v in Hugging Face's layout ([B, L, H, D] viewed as [B, H, L, D]), prompt ids that include -1
    and random prefix_lens when multi-prompt, left padding when padded. Returns (tensors, kwargs, grad)."""
    B, Hq, Hkv, Lq, Lk, P, K, D, causal, padded, multi = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, device="cuda", generator=gen, dtype=torch.float32)

    tensors = [rand(B, Lq, Hq, D).transpose(1, 2), rand(B, Lk, Hkv, D).transpose(1, 2),
               rand(B, Lk, Hkv, D).transpose(1, 2), rand(P, Hkv, K, D), rand(P, Hkv, K, D)]
    kwargs = {"causal": causal}
    if multi:
        kwargs["prompt_ids"] = (torch.arange(B, device="cuda") % (P + 1)) - 1
        kwargs["prefix_lens"] = torch.randint(0, K + 1, (P,), device="cuda", generator=gen)
    if padded:
        lengths = torch.randint(Lk // 2, Lk + 1, (B,), device="cuda", generator=gen)
        kwargs["key_padding_mask"] = torch.arange(Lk, device="cuda")[None, :] >= (Lk - lengths[:, None])
    grad = torch.randn(B, Hq, Lq, D, device="cuda", generator=gen)
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors], kwargs, grad.to(dtype)


def run_torchrun(script: str, args, timeout: int, env=None, nproc: int = 2) -> str:
    """``python -m torch.distributed.run`` on a free port; on a timeout torchrun and every rank are killed, so that
    no rank outlives the test (an orphaned rank can stall the next run's collectives, and holds the output pipe
    open); returns the output, fails the test with its tail otherwise.

    torchrun starts each rank in a session of its own, so killing torchrun's process group leaves the ranks
    running (stuck in a rendezvous whose store died with torchrun): they are found as its descendants first.
    """
    import os
    import subprocess
    import sys

    import pytest

    from softprompt_kernels.bench.harness import free_port, kill_process_tree

    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), script, *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ if env is None else env, OMP_NUM_THREADS="1"))
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process.pid)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something still holds the pipe: fail with what there is
            output = "(no output: the pipe stayed open after the kill)"
        pytest.fail(f"{os.path.basename(script)} ranks ran past {timeout} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-4000:]
    return output
