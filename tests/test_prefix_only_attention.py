"""Prefix-only attention (docs/DESIGN.md section 2): Lk = 0, so a query sees its prompt's prefix only.

What ADAPTION_PROMPT needs (a separate softmax over the adapter tokens). Allowed with any Lq when
``causal=False`` and ``window=None``; checked on every CPU-runnable backend against the float64
oracle (outputs, lse, every gradient), with prompt ids including -1 (zeros out, lse -inf or the
sink), prefix_lens, GQA/MQA, head dims that are not powers of two, a [B, 0] padding mask, and the
modern-attention features that do not need an alignment (softcap, sinks); gradcheck in float64;
the rejections name the argument.
"""
import math

import pytest
import torch

import softprompt_kernels as sk
from helpers import Case, assert_matches_oracle, backend_results, cached_oracle_results, forward_op_args, make_inputs
from softprompt_kernels import InvalidArgumentError

BACKENDS = ["torch", "cpu", "triton"]  # triton: its interpreter on CPU tensors (conftest)

CASES = [
    Case(3, 4, 2, 5, 0, 3, 4, 8, causal=False, prompt_ids=[1, -1, 2], prefix_lens=[4, 2, 3], name="multi-prompt-gqa"),
    Case(2, 4, 4, 20, 0, 1, 19, 16, causal=False, name="mha-one-prompt-across-blocks"),  # interpreter blocks: 16
    Case(2, 6, 1, 7, 0, 1, 5, 12, causal=False, name="mqa-odd-d"),
    Case(2, 2, 1, 1, 0, 2, 6, 8, causal=False, prompt_ids=[0, 1], prefix_lens=[6, 0], name="decode-lq1-empty-prompt"),
    Case(2, 2, 1, 3, 0, 2, 5, 8, causal=False, prompt_ids=[1, 0], padding=[[], []], name="empty-padding-mask"),
    Case(2, 4, 2, 6, 0, 2, 3, 8, causal=False, prompt_ids=[1, -1], softcap=0.7, sinks=True, name="softcap-sinks"),
    Case(2, 2, 2, 4, 0, 1, 0, 8, causal=False, name="k-zero-sees-nothing"),
    Case(2, 2, 2, 4, 0, 0, 3, 8, causal=False, prompt_ids=[-1, -1], name="empty-bank"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_prefix_only_matches_oracle(case, backend):
    assert_matches_oracle(backend_results(case, backend, torch.float32), cached_oracle_results(case), rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # triton takes no float64
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_prefix_only_float64_matches_oracle_tightly(case, backend):
    assert_matches_oracle(backend_results(case, backend, torch.float64), cached_oracle_results(case), rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=str)
def test_prefix_only_gradcheck_float64(case, backend):
    tensors, kwargs = make_inputs(case, dtype=torch.float64)
    sinks = kwargs.pop("sinks", None)
    tensors = [t for i, t in enumerate(tensors) if i not in (1, 2)]  # k, v are empty: nothing to perturb
    k = v = torch.zeros(case.B, case.Hkv, 0, case.D, dtype=torch.float64)
    leaves = tensors + ([sinks] if sinks is not None else [])

    def fn(q, pk, pv, *rest):
        extra = {"sinks": rest[0]} if rest else {}
        out, lse = sk.prefix_attention(q, k, v, pk, pv, **kwargs, **extra, return_lse=True, backend=backend)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)  # a -inf lse (row without prompt) has no slope

    assert torch.autograd.gradcheck(fn, leaves, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_without_prompt_gets_zeros_minus_inf_lse_and_zero_gradients(backend):
    case = CASES[0]  # row 1 has prompt id -1
    (q, k, v, pk, pv), kwargs = make_inputs(case)
    out, lse = sk.prefix_attention(q, k, v, pk, pv, **kwargs, return_lse=True, backend=backend)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    assert torch.isfinite(lse[[0, 2]]).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert torch.all(q.grad[1] == 0) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_only_equals_a_separate_softmax_over_the_prompt(backend):
    """The ADAPTION_PROMPT computation: softmax(q P_k^T * scale) P_v, one prompt broadcast to every row."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 9, 16, generator=gen)
    pk, pv = torch.randn(1, 2, 6, 16, generator=gen), torch.randn(1, 2, 6, 16, generator=gen)
    empty = q.new_zeros(3, 2, 0, 16)
    out = sk.prefix_attention(q, empty, empty, pk, pv, causal=False, backend=backend)
    keys, values = pk.repeat_interleave(2, dim=1), pv.repeat_interleave(2, dim=1)
    expected = torch.softmax(q @ keys.transpose(-1, -2) / 4.0, dim=-1) @ values
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _prefix_only_args(Lq=3, Lk=0):
    q = torch.randn(2, 2, Lq, 8)
    k = v = torch.randn(2, 1, Lk, 8)
    return q, k, v, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)


@pytest.mark.parametrize("over, match", [
    (dict(causal=True), r"Lq=3 must not exceed k's length Lk=0.*causal=False and window=None, got causal=True"),
    (dict(causal=False, window=2), r"Lq=3 must not exceed k's length Lk=0.*got causal=False, window=2"),
])
def test_prefix_only_needs_noncausal_without_window(over, match):
    with pytest.raises(InvalidArgumentError, match=match):
        sk.prefix_attention(*_prefix_only_args(), **over, backend="torch")


def test_lq_above_a_nonzero_lk_is_still_rejected():
    with pytest.raises(InvalidArgumentError, match=r"Lq=3 must not exceed k's length Lk=2"):
        sk.prefix_attention(*_prefix_only_args(Lk=2), causal=False, backend="torch")


@pytest.mark.parametrize("window", [None, 2])
def test_direct_cpu_op_call_rejects_causal_or_windowed_prefix_only(window):
    q, k, v, pk, pv = _prefix_only_args()
    with pytest.raises(ValueError, match=r"q length \(3\) must not exceed k length \(0\) unless k is empty"):
        torch.ops.softprompt_kernels.prefix_attention_fwd(*forward_op_args([q, k, v, pk, pv], causal=window is None,
                                                                           scale=0.3, window=window))
    out, _ = torch.ops.softprompt_kernels.prefix_attention_fwd(*forward_op_args([q, k, v, pk, pv], causal=False,
                                                                                scale=0.3))
    assert out.shape == q.shape
