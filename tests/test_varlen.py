"""Variable-length rows (``cu_seqlens``, docs/DESIGN.md section 2b): each packed sequence gets what it would get
alone — its own prompt and prefix offset, causality and windows inside it — against the float64 oracle, which
states that sequence by sequence. The reference (torch) backend serves them; the fused backends refuse them by
name until their kernels take them, and ``auto`` says so once."""
import warnings

import pytest
import torch

import softprompt_kernels as sk
from helpers import forward_op_args
from oracle import oracle_prefix_attention

NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def packed(lengths, Hq=4, Hkv=2, P=3, K=5, D=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    tensors = [rand(1, Hq, total, D), rand(1, Hkv, total, D), rand(1, Hkv, total, D), rand(P, Hkv, K, D),
               rand(P, Hkv, K, D)]
    cu_seqlens = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return tensors, cu_seqlens


def results(fn, tensors, kwargs):
    out, lse = fn(*tensors, **kwargs, return_lse=True)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    finite = torch.isfinite(lse)
    loss = (out.double() * weights).sum() + torch.where(finite, lse, torch.zeros_like(lse)).double().sum()
    return [out, lse, *torch.autograd.grad(loss, tensors, allow_unused=True)]


def assert_equal_to_oracle(tensors, kwargs, rtol=1e-10):
    ours = results(lambda *a, **kw: sk.prefix_attention(*a, **kw, backend="torch"), tensors, kwargs)
    reference = results(oracle_prefix_attention, tensors, kwargs)
    for name, a, b in zip(NAMES, ours, reference):
        a, b = torch.nan_to_num(a, neginf=0.0), torch.nan_to_num(b, neginf=0.0)
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12, msg=lambda m: f"{name}: {m}")


CASES = {
    "lengths-1": dict(lengths=[1, 1, 1, 1], prompt_ids=[0, 2, -1, 1]),
    "many-short-one-long": dict(lengths=[2, 1, 3, 17, 1, 2], prompt_ids=[0, 1, 2, 0, -1, 1]),
    "an-empty-sequence": dict(lengths=[3, 0, 4], prompt_ids=[1, 0, 2]),
    "one-sequence": dict(lengths=[7], prompt_ids=[2]),
    "prefix-lens": dict(lengths=[4, 5, 2], prompt_ids=[0, 1, 2], prefix_lens=[5, 0, 2]),
}
FEATURES = {
    "plain": {},
    "full-attention": dict(causal=False),
    "window": dict(window=3),
    "window-offsets": dict(window=2, offsets=True),
    "softcap-sinks": dict(softcap=0.7, sinks=True),
}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("case", CASES)
def test_each_sequence_gets_what_it_would_get_alone(case, feature):
    spec, extra = dict(CASES[case]), dict(FEATURES[feature])
    tensors, cu_seqlens = packed(spec.pop("lengths"))
    kwargs = dict(cu_seqlens=cu_seqlens, prompt_ids=torch.tensor(spec.pop("prompt_ids")))
    if "prefix_lens" in spec:
        kwargs["prefix_lens"] = torch.tensor(spec.pop("prefix_lens"))
    if extra.pop("offsets", False):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        kwargs["prefix_offsets"] = lengths // 2
    if extra.pop("sinks", False):
        kwargs["sinks"] = torch.randn(4, dtype=torch.float64, requires_grad=True)
    kwargs.update(extra)
    assert_equal_to_oracle(tensors, kwargs)


def test_one_sequence_equals_the_plain_row():
    tensors, cu_seqlens = packed([9], P=1)
    plain = sk.prefix_attention(*tensors, window=4, backend="torch")
    torch.testing.assert_close(sk.prefix_attention(*tensors, window=4, cu_seqlens=cu_seqlens, backend="torch"), plain,
                               rtol=0, atol=0)


def test_sequences_do_not_see_each_other():
    """Changing one sequence's keys changes no other sequence's output."""
    tensors, cu_seqlens = packed([3, 4, 2], P=1)
    q, k, v, pk, pv = (t.detach() for t in tensors)
    before = sk.prefix_attention(q, k, v, pk, pv, cu_seqlens=cu_seqlens, causal=False, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3:7] += 1.0
    v2[:, :, 3:7] -= 2.0
    after = sk.prefix_attention(q, k2, v2, pk, pv, cu_seqlens=cu_seqlens, causal=False, backend="torch")
    torch.testing.assert_close(after[:, :, :3], before[:, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(after[:, :, 7:], before[:, :, 7:], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 3:7], before[:, :, 3:7])


def test_prefix_gradient_is_summed_over_the_sequences_of_a_prompt():
    tensors, cu_seqlens = packed([2, 3, 4], P=2)
    ids = torch.tensor([1, 0, 1])
    out = sk.prefix_attention(*tensors, prompt_ids=ids, cu_seqlens=cu_seqlens, backend="torch")
    grads = torch.autograd.grad(out.sum(), tensors[3:])
    expected = [torch.zeros_like(g) for g in grads]
    for s, prompt in enumerate(ids.tolist()):
        lo, hi = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        alone = [t[:, :, lo:hi] for t in tensors[:3]]
        piece = sk.prefix_attention(*alone, *tensors[3:], prompt_ids=ids[s:s + 1], backend="torch")
        for e, g in zip(expected, torch.autograd.grad(piece.sum(), tensors[3:])):
            e += g
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_gradcheck():
    tensors, cu_seqlens = packed([2, 1, 3], Hq=2, Hkv=1, P=2, K=2, D=3)
    ids = torch.tensor([1, -1, 0])
    torch.autograd.gradcheck(lambda *t: sk.prefix_attention(*t, prompt_ids=ids, cu_seqlens=cu_seqlens, window=2,
                                                            backend="torch"), tensors)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_fused_backends_refuse_it_by_name_and_auto_says_so(backend, monkeypatch):
    if backend not in sk.available_backends():
        pytest.skip(f"{backend} is not available here: {sk.backend_status()[backend]}")
    tensors, cu_seqlens = packed([2, 3], P=1, dtype=torch.float32)
    reasons = sk.not_supported_reasons(backend, *tensors, cu_seqlens=cu_seqlens)
    assert any("no variable-length rows (cu_seqlens)" in r for r in reasons), reasons
    monkeypatch.setattr("softprompt_kernels.common._warned", set())
    with pytest.warns(sk.PerformanceWarning, match="variable-length rows"):
        sk.prefix_attention(*tensors, cu_seqlens=cu_seqlens)


def test_a_direct_cpu_op_call_refuses_it():
    tensors, cu_seqlens = packed([2, 3], P=1, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        torch.ops.softprompt_kernels.prefix_attention_fwd(*forward_op_args([t.detach() for t in tensors],
                                                                           cu_seqlens=cu_seqlens))


BAD = [
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), sk.InvalidDtypeError, "^cu_seqlens must be an int32 or int64"),
    (dict(cu_seqlens=torch.tensor([[0, 5]])), sk.InvalidArgumentError, r"^cu_seqlens must have rank 1"),
    (dict(cu_seqlens=torch.tensor([1, 5])), sk.InvalidArgumentError, "^cu_seqlens must start with 0"),
    (dict(cu_seqlens=torch.tensor([0, 4])), sk.InvalidArgumentError, r"^cu_seqlens must end with the total token "
                                                                     r"count Lq=5"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), sk.InvalidArgumentError, "^cu_seqlens must not decrease"),
    (dict(prompt_ids=torch.tensor([0, 0, 0])), sk.InvalidArgumentError, r"^prompt_ids must have shape \[S=2\]"),
    (dict(prefix_offsets=torch.tensor([0, 4]), window=2), sk.InvalidArgumentError,
     r"^prefix_offsets\[s\] must lie in \[0, length of sequence s\]"),
    (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), sk.InvalidArgumentError,
     "^key_padding_mask must be None with cu_seqlens"),
]


@pytest.mark.parametrize("over, error, match", BAD, ids=lambda x: str(x)[:30])
def test_bad_variable_length_rows_name_the_argument(over, error, match):
    tensors, cu_seqlens = packed([2, 3], P=1)
    kwargs = {"cu_seqlens": cu_seqlens, **over}
    with pytest.raises(error, match=match):
        sk.prefix_attention(*tensors, **kwargs, backend="torch")


def test_packed_rows_must_be_one_row_with_every_token():
    tensors, _ = packed([2, 3], P=1)
    q, k, v, pk, pv = tensors
    two_rows = [t.reshape(1, t.shape[1], 5, t.shape[3]).expand(2, -1, -1, -1) for t in (q, k, v)]
    with pytest.raises(sk.InvalidArgumentError, match="one packed row of all the sequences' tokens: B=1"):
        sk.prefix_attention(*two_rows, pk, pv, cu_seqlens=torch.tensor([0, 2, 5]), backend="torch")
    with pytest.raises(sk.InvalidArgumentError, match="Lq=Lk=total"):
        sk.prefix_attention(q[:, :, :4], k, v, pk, pv, cu_seqlens=torch.tensor([0, 2, 4]), backend="torch")


def test_no_sequences_at_all():
    tensors, cu_seqlens = packed([], P=1)
    out, lse = sk.prefix_attention(*tensors, cu_seqlens=torch.tensor([0]), return_lse=True, backend="torch")
    assert out.shape == (1, 4, 0, 8) and lse.shape == (1, 4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sk.PerformanceWarning)
        assert sk.prefix_attention(*tensors, cu_seqlens=torch.tensor([0])).shape == (1, 4, 0, 8)
