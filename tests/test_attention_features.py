"""Sliding windows, soft-capping and attention sinks (docs/DESIGN.md section 2) on every CPU-runnable backend.

Each feature alone and combined, with multi-prompt banks (-1 rows, prefix_lens), padding, GQA, decode
shapes, K = 0 and non-causal attention, against the float64 oracle (outputs, lse and every gradient,
the sinks' included); gradcheck in float64; one test per rejected value, naming the argument.
"""
from dataclasses import replace

import pytest
import torch

import softprompt_kernels as sk
from helpers import Case, assert_matches_oracle, backend_results, cached_oracle_results, forward_op_args, make_inputs

BACKENDS = ["torch", "cpu", "triton"]  # triton: its interpreter on CPU tensors (conftest)

BASE = {
    "multi-prompt-padded-gqa": Case(3, 4, 2, 5, 7, 3, 4, 8, prompt_ids=[1, -1, 2], prefix_lens=[4, 2, 3],
                                    padding=[[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]),
    "decode-lq1": Case(2, 4, 2, 1, 40, 1, 6, 8),
    "decode-lq3-multi": Case(3, 6, 3, 3, 21, 2, 5, 16, prompt_ids=[0, 1, -1], prefix_lens=[5, 1]),
    "k-zero": Case(2, 4, 2, 7, 7, 1, 0, 8),
    "noncausal": Case(2, 4, 2, 6, 6, 2, 3, 8, causal=False, prompt_ids=[1, 0]),
    "lq-lt-lk-odd-d": Case(2, 2, 1, 9, 30, 2, 5, 12, prompt_ids=[1, 0], padding=[[0] * 4 + [1] * 26, [1] * 30]),
}
FEATURES = {
    "window-2": dict(window=2),  # shorter than prefix + text: the prefix drops out of reach
    "window-5": dict(window=5),
    "window-1": dict(window=1),  # a query sees only itself (and the prefix right before the first token)
    "softcap": dict(softcap=0.6),  # strong: scores of norm ~3 are squashed hard
    "sinks": dict(sinks=True),
    "all": dict(window=4, softcap=1.5, sinks=True),
}
CASES = [replace(case, name=f"{name}+{feature}", **extra) for name, case in BASE.items()
         for feature, extra in FEATURES.items()]
# the prefix right before a later key of each row (serving puts it after a row's left padding)
CASES += [replace(BASE["multi-prompt-padded-gqa"], name="multi-prompt-padded-gqa+offsets", window=4,
                  prefix_offsets=[0, 2, 5]),
          replace(BASE["decode-lq3-multi"], name="decode-lq3-multi+offsets+all", window=5, softcap=1.5, sinks=True,
                  prefix_offsets=[20, 3, 0]),
          replace(BASE["noncausal"], name="noncausal+offsets+all", window=3, softcap=1.0, sinks=True,
                  prefix_offsets=[6, 1])]
# long enough to cross the kernels' key blocks (CPU: 128; Triton's interpreter: 16)
LONG = [replace(Case(2, 2, 1, 150, 150, 2, 130, 8, prompt_ids=[1, 0], prefix_lens=[130, 129]), name=f"long+{f}", **e)
        for f, e in (("window-40", dict(window=40)), ("window-140", dict(window=140)), ("all", dict(window=60,
                     softcap=2.0, sinks=True)))]


def _params(cases):
    """Every case on torch and cpu; on Triton's (slow) interpreter the combined-feature cases only,
    unless slow tests run."""
    out = []
    for case in cases:
        for backend in BACKENDS:
            slow = backend == "triton" and not case.name.endswith("+all")
            out.append(pytest.param(case, backend, marks=[pytest.mark.slow] if slow else [], id=f"{case}-{backend}"))
    return out


@pytest.mark.parametrize("case, backend", _params(CASES))
def test_features_match_oracle(case, backend):
    assert_matches_oracle(backend_results(case, backend, torch.float32), cached_oracle_results(case), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LONG, ids=str)
def test_features_across_key_blocks_match_oracle(case, backend):
    assert_matches_oracle(backend_results(case, backend, torch.float32), cached_oracle_results(case), rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # triton takes no float64
@pytest.mark.parametrize("case", [CASES[i] for i in (5, 10, 16, 29)], ids=str)
def test_gradcheck_float64(case, backend):
    tensors, kwargs = make_inputs(case, dtype=torch.float64)
    sinks = kwargs.pop("sinks", None)
    leaves = tensors + ([sinks] if sinks is not None else [])

    def fn(*xs):
        extra = {"sinks": xs[5]} if sinks is not None else {}
        return sk.prefix_attention(*xs[:5], **kwargs, **extra, return_lse=True, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, atol=1e-6, rtol=1e-5)


def test_a_query_that_sees_nothing_gets_zeros_and_its_sink_as_lse():
    case = Case(2, 2, 2, 3, 3, 1, 2, 4, prompt_ids=[-1, 0], padding=[[0, 0, 0], [1, 1, 1]], sinks=True)
    for backend in ("torch", "cpu", "triton"):
        tensors, kwargs = make_inputs(case, requires_grad=False)
        out, lse = sk.prefix_attention(*tensors, **kwargs, return_lse=True, backend=backend)
        assert torch.all(out[0] == 0), backend
        torch.testing.assert_close(lse[0], kwargs["sinks"][:, None].expand(2, 3))


def test_window_reproduces_a_prefix_in_the_cache():
    """The window counts the prefix as positions right before the text: the same as concatenating it."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    pk, pv = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 4, 8, generator=gen)
    for window in (1, 3, 7, 20):
        ours = sk.prefix_attention(q, k, v, pk, pv, window=window, backend="cpu")
        concatenated = sk.prefix_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), pk[:, :, :0],
                                           pv[:, :, :0], window=window, backend="torch")
        torch.testing.assert_close(ours, concatenated)


# --- rejections: one test each, the message names the argument

def _call(**over):
    tensors, kwargs = make_inputs(Case(2, 4, 2, 3, 5, 1, 2, 8), requires_grad=False)
    sk.prefix_attention(*tensors, **dict(kwargs, **over))


@pytest.mark.parametrize("over, exc, match", [
    (dict(window=0), sk.InvalidArgumentError, r"^window must be >= 1"),
    (dict(window=-3), sk.InvalidArgumentError, r"^window must be >= 1"),
    (dict(window=2.5), sk.InvalidDtypeError, r"^window must be a positive int"),
    (dict(window=True), sk.InvalidDtypeError, r"^window must be a positive int"),
    (dict(softcap=0.0), sk.InvalidArgumentError, r"^softcap must be finite and > 0"),
    (dict(softcap=-1.0), sk.InvalidArgumentError, r"^softcap must be finite and > 0"),
    (dict(softcap=float("inf")), sk.InvalidArgumentError, r"^softcap must be finite and > 0"),
    (dict(softcap="big"), sk.InvalidDtypeError, r"^softcap must be a positive real number"),
    (dict(sinks=torch.zeros(3)), sk.InvalidArgumentError, r"^sinks must have shape \[Hq=4\]"),
    (dict(sinks=torch.zeros(1, 4)), sk.InvalidArgumentError, r"^sinks must have rank 1"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), sk.InvalidDtypeError, r"^sinks must be a floating-point tensor"),
    (dict(sinks=torch.zeros(4, device="meta")), sk.InvalidArgumentError, r"^sinks must be on q's device"),
    (dict(sinks=[0.0] * 4), sk.InvalidDtypeError, r"^sinks must be a torch.Tensor"),
    (dict(prefix_offsets=torch.tensor([0])), sk.InvalidArgumentError, r"^prefix_offsets must have shape \[B=2\]"),
    (dict(prefix_offsets=torch.tensor([0.0, 1.0])), sk.InvalidDtypeError, r"^prefix_offsets must be an int32 or int64"),
    (dict(prefix_offsets=torch.tensor([0, 6])), sk.InvalidArgumentError, r"^prefix_offsets must lie in \[0, Lk=5\]"),
    (dict(prefix_offsets=torch.tensor([-1, 0])), sk.InvalidArgumentError, r"^prefix_offsets must lie in \[0, Lk=5\]"),
], ids=lambda x: str(x)[:40])
def test_rejects_bad_values(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_direct_op_call_rejects_bad_values():
    tensors, _ = make_inputs(Case(2, 4, 2, 3, 5, 1, 2, 8), requires_grad=False)
    op = torch.ops.softprompt_kernels.prefix_attention_fwd
    with pytest.raises(ValueError, match="window must be >= 1"):
        op(*forward_op_args(tensors, scale=0.3, window=0))
    with pytest.raises(ValueError, match="softcap must be finite and > 0"):
        op(*forward_op_args(tensors, scale=0.3, softcap=-2.0))
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq=4\]"):
        op(*forward_op_args(tensors, scale=0.3, sinks=torch.zeros(2)))
