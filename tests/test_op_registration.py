"""torch.library registration: torch.compile(fullgraph=True), no copies of strided inputs (opcheck: test_opcheck.py)."""
import pytest
import torch

import softprompt_kernels as sk
from helpers import Case, make_inputs

OPCHECK_CASES = [
    Case(2, 4, 2, 3, 5, 2, 3, 8, prompt_ids=[1, -1], prefix_lens=[2, 3], padding=[[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    Case(2, 2, 2, 4, 4, 1, 3, 4, causal=False),
    Case(1, 2, 1, 1, 6, 1, 0, 8),
]


def _op_args(case, dtype=torch.float32):
    (q, k, v, pk, pv), kw = make_inputs(case, dtype=dtype)
    return (q, k, v, pk, pv, kw.get("prompt_ids"), kw.get("prefix_lens"), kw.get("key_padding_mask"),
            kw["causal"], 0.3)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    case = OPCHECK_CASES[0]
    tensors, kwargs = make_inputs(case)

    def step(q, k, v, pk, pv, ids, lens, mask):
        out = sk.prefix_attention(q, k, v, pk, pv, prompt_ids=ids, prefix_lens=lens, key_padding_mask=mask,
                                  backend="cpu")
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (*tensors, kwargs["prompt_ids"], kwargs["prefix_lens"], kwargs["key_padding_mask"])
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, tensors)
    eager_loss = step(*args)
    eager_grads = torch.autograd.grad(eager_loss, tensors)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_inductor_auto_backend():
    torch._dynamo.reset()
    tensors, kwargs = make_inputs(OPCHECK_CASES[1], requires_grad=False)

    @torch.compile(fullgraph=True)
    def attend(q, k, v, pk, pv):
        return sk.prefix_attention(q, k, v, pk, pv, causal=False) * 2

    torch.testing.assert_close(attend(*tensors), 2 * sk.prefix_attention(*tensors, causal=False, backend="torch"))


def _hf_style_views(B=2, Hq=4, Hkv=2, L=6, D=8, K=3):
    """Q/K/V as Hugging Face hands them to attention: [B, L, H*D] projections viewed as [B, H, L, D]."""
    q = torch.randn(B, L, Hq * D).view(B, L, Hq, D).transpose(1, 2)
    k = torch.randn(B, L, Hkv * D).view(B, L, Hkv, D).transpose(1, 2)
    v = torch.randn(B, L, Hkv * D).view(B, L, Hkv, D).transpose(1, 2)
    pk = torch.randn(1, Hkv, K, D)
    pv = torch.randn(1, Hkv, K, D)
    return q, k, v, pk, pv


def test_transposed_views_are_not_copied():
    q, k, v, pk, pv = _hf_style_views()
    assert not q.is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = sk.prefix_attention(q, k, v, pk, pv, backend="cpu")
    copying = {"aten::contiguous", "aten::clone", "aten::copy_", "aten::cat", "aten::index_select",
               "aten::repeat_interleave", "aten::expand"}
    called = {e.name for e in prof.events()}
    assert not (called & copying), f"copies on the cpu path: {called & copying}"
    torch.testing.assert_close(out, sk.prefix_attention(q, k, v, pk, pv, backend="torch"), rtol=1e-5, atol=1e-6)
    # out comes back laid out as [B, L, H, D]: Hugging Face's transpose(1, 2).reshape is free
    assert out.transpose(1, 2).is_contiguous()


def test_non_contiguous_last_dim_is_accepted():
    q, k, v, pk, pv = _hf_style_views()
    q_odd = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3] * 2)[..., ::2]
    expected = sk.prefix_attention(q_odd.contiguous(), k, v, pk, pv, backend="torch")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = sk.prefix_attention(q_odd, k, v, pk, pv, backend="cpu")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the one case that needs a copy, and the profiler sees it (so the no-copy test above can fail)
    assert "aten::contiguous" in {e.name for e in prof.events()}


def test_int32_prompt_ids_and_lengths():
    case = Case(3, 2, 2, 4, 4, 2, 3, 8, prompt_ids=[1, 0, -1], prefix_lens=[1, 3])
    tensors, kwargs = make_inputs(case)
    expected = sk.prefix_attention(*tensors, **kwargs, backend="torch")
    kwargs["prompt_ids"] = kwargs["prompt_ids"].int()
    kwargs["prefix_lens"] = kwargs["prefix_lens"].int()
    torch.testing.assert_close(sk.prefix_attention(*tensors, **kwargs, backend="cpu"), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_prompt_ids_lengths_and_mask(backend):
    """Index tensors and masks that are views with strides are read correctly."""
    case = Case(3, 2, 2, 4, 6, 2, 3, 8)
    tensors, _ = make_inputs(case)
    table = torch.tensor([[1, 9], [-1, 9], [0, 9]])
    lens_table = torch.tensor([[2, 7], [3, 7]])
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[:2, 1] = False
    kwargs = dict(prompt_ids=table[:, 0], prefix_lens=lens_table[:, 0], key_padding_mask=mask.t())
    assert not kwargs["prompt_ids"].is_contiguous() and not kwargs["key_padding_mask"].is_contiguous()
    dense = {k: v.contiguous() for k, v in kwargs.items()}
    expected = sk.prefix_attention(*tensors, **dense, backend="torch")
    torch.testing.assert_close(sk.prefix_attention(*tensors, **kwargs, backend=backend), expected,
                               rtol=1e-5, atol=1e-6)
