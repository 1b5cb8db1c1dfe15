"""gradcheck in float64, the prefix-gradient reduction over rows, and exact zeros where nothing is seen."""
import pytest
import torch

import softprompt_kernels as sk
from helpers import Case, backward_op_args, backward_op_named, forward_op_args, make_inputs, upstream_grad

BACKENDS = ["torch", "cpu"]

GRADCHECK_CASES = [
    Case(2, 4, 2, 3, 4, 2, 3, 4, prompt_ids=[1, 0], prefix_lens=[2, 3], padding=[[0, 1, 1, 1], [1, 1, 1, 0]],
         name="multi-prompt-padded"),
    Case(2, 2, 1, 2, 5, 1, 2, 3, causal=True, name="decode-gqa"),
    Case(2, 2, 2, 3, 3, 2, 2, 4, causal=False, prompt_ids=[-1, 1], name="noncausal-no-prompt-row"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case, backend):
    tensors, kwargs = make_inputs(case, dtype=torch.float64)

    def fn(*xs):
        return sk.prefix_attention(*xs, **kwargs, return_lse=True, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_grads_are_sums_over_rows_sharing_a_prompt(backend):
    """Rows run alone with their prompt's prefix: the batched prefix gradient is the sum of theirs."""
    case = Case(5, 4, 2, 5, 7, 3, 6, 8, prompt_ids=[2, 0, 2, -1, 2], prefix_lens=[6, 6, 4],
                padding=[[1] * 7, [0, 1, 1, 1, 1, 1, 1], [1] * 6 + [0], [1] * 7, [0, 0] + [1] * 5])
    tensors, kwargs = make_inputs(case, dtype=torch.float64)
    q, k, v, pk, pv = tensors
    out = sk.prefix_attention(*tensors, **kwargs, backend=backend)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dpk, dpv = torch.autograd.grad((out * weights).sum(), [pk, pv])

    expected_k, expected_v = torch.zeros_like(pk), torch.zeros_like(pv)
    for b, prompt in enumerate(case.prompt_ids):
        if prompt < 0:
            continue
        n = case.prefix_lens[prompt]
        row_pk = pk[prompt:prompt + 1, :, :n].detach().requires_grad_()
        row_pv = pv[prompt:prompt + 1, :, :n].detach().requires_grad_()
        row_out = sk.prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], row_pk, row_pv,
                                      key_padding_mask=kwargs["key_padding_mask"][b:b + 1], backend="torch")
        gk, gv = torch.autograd.grad((row_out * weights[b:b + 1]).sum(), [row_pk, row_pv])
        expected_k[prompt, :, :n] += gk[0]
        expected_v[prompt, :, :n] += gv[0]
    torch.testing.assert_close(dpk, expected_k, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dpv, expected_v, rtol=1e-10, atol=1e-12)
    # slots past prefix_lens and prompts no row uses get exactly zero
    assert torch.all(dpk[2, :, 4:] == 0) and torch.all(dpv[2, :, 4:] == 0)
    assert torch.all(dpk[1] == 0) and torch.all(dpv[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_that_sees_nothing_gets_zeros_and_zero_grads(backend, dtype):
    case = Case(2, 2, 1, 4, 4, 1, 3, 8, prompt_ids=[-1, 0], padding=[[0, 0, 1, 1], [0, 0, 0, 0]])
    tensors, kwargs = make_inputs(case, dtype=dtype)
    out, lse = sk.prefix_attention(*tensors, **kwargs, return_lse=True, backend=backend)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # row 0 has no prompt and its first two keys are padding: queries 0 and 1 see nothing
    assert torch.all(out[0, :, :2] == 0)
    assert torch.all(lse[0, :, :2] == float("-inf"))
    assert torch.isfinite(lse[0, :, 2:]).all() and torch.isfinite(lse[1]).all()
    grads = torch.autograd.grad(out.float().sum(), tensors)
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.all(grads[0][0, :, :2] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_queries(backend):
    for case in (Case(0, 2, 2, 3, 3, 1, 2, 4), Case(2, 2, 2, 0, 3, 1, 2, 4)):
        tensors, kwargs = make_inputs(case)
        out, lse = sk.prefix_attention(*tensors, **kwargs, return_lse=True, backend=backend)
        assert out.shape == tensors[0].shape and lse.shape == tensors[0].shape[:3]
        grads = torch.autograd.grad(out.sum(), tensors, allow_unused=True)
        for g, t in zip(grads, tensors):
            assert g is None or (g.shape == t.shape and torch.all(g == 0))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_expanded_upstream_gradients(backend):
    """lse.sum() and out.sum() hand back stride-0 gradients; the kernels must not read them as dense."""
    case = Case(2, 4, 2, 5, 7, 2, 3, 8, prompt_ids=[1, 0], padding=[[1] * 7, [0, 1, 1, 1, 1, 1, 1]])
    results = []
    for name in ("torch", backend):
        tensors, kwargs = make_inputs(case)
        out, lse = sk.prefix_attention(*tensors, **kwargs, return_lse=True, backend=name)
        results.append(torch.autograd.grad(out.sum() + lse.sum(), tensors))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


FROZEN_SUBSETS = {
    "prefix-only": (False, False, False, True, True),  # a frozen first layer under prompt or prefix tuning
    "sequence-only": (True, True, True, False, False),  # frozen prefix (a served adapter, fine-tuning the rest)
    "q-and-prefix-v": (True, False, False, False, True),
}


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])  # triton: in the interpreter here (conftest)
@pytest.mark.parametrize("subset", list(FROZEN_SUBSETS), ids=str)
@pytest.mark.parametrize("case", GRADCHECK_CASES[:2], ids=str)
def test_gradients_of_a_subset_of_inputs_equal_the_full_backward(case, subset, backend):
    """Only some inputs need gradients (autograd's needs_input_grad): the backward skips the rest's
    work, and the gradients it does return equal those of the full backward."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    tensors, kwargs = make_inputs(case, dtype=dtype)
    weights = upstream_grad((case.B, case.Hq, case.Lq, case.D), dtype=dtype)
    full = torch.autograd.grad((sk.prefix_attention(*tensors, **kwargs, backend=backend) * weights).sum(), tensors)
    wanted = FROZEN_SUBSETS[subset]
    inputs = [t.detach().requires_grad_(w) for t, w in zip(tensors, wanted)]
    out = sk.prefix_attention(*inputs, **kwargs, backend=backend)
    grads = torch.autograd.grad((out * weights).sum(), [t for t in inputs if t.requires_grad])
    expected = [g for g, w in zip(full, wanted) if w]
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("seq_grads,prefix_grads", [(False, True), (True, False), (False, False)])
def test_backward_op_returns_unwanted_gradients_empty(seq_grads, prefix_grads):
    (q, k, v, pk, pv), kw = make_inputs(GRADCHECK_CASES[0], dtype=torch.float64, requires_grad=False)
    named = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, scale=0.5, **kw)
    out, lse = torch.ops.softprompt_kernels.prefix_attention_fwd(*forward_op_args([], **named))
    grad_out = upstream_grad(out.shape)
    bwd = torch.ops.softprompt_kernels.prefix_attention_bwd
    full = bwd(*backward_op_args(grad_out=grad_out, grad_lse=None, out=out, lse=lse, **named))
    part = bwd(*backward_op_args(grad_out=grad_out, grad_lse=None, out=out, lse=lse, seq_grads=seq_grads,
                                 prefix_grads=prefix_grads, **named))
    for index, (got, exp) in enumerate(zip(part, full)):
        if (seq_grads if index < 3 else prefix_grads):
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)
        else:
            assert got.shape == (0,), f"gradient {index} was not asked for but has shape {tuple(got.shape)}"


@pytest.mark.parametrize("frozen,expected_flags", [("sequence", (False, True)), ("prefix", (True, False)),
                                                   ("nothing", (True, True))])
def test_autograd_asks_the_cpu_backward_only_for_needed_gradients(frozen, expected_flags):
    """The flags reach the backward op (not only the results are right: the skipped work is skipped)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class RecordBackwardCalls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.softprompt_kernels.prefix_attention_bwd.default:
                named = backward_op_named(args, kwargs)
                calls.append((named["seq_grads"], named["prefix_grads"]))
            return func(*args, **(kwargs or {}))

    case = GRADCHECK_CASES[0]
    tensors, kwargs = make_inputs(case, dtype=torch.float64)
    wanted = {"sequence": (False,) * 3 + (True,) * 2, "prefix": (True,) * 3 + (False,) * 2,
              "nothing": (True,) * 5}[frozen]
    inputs = [t.detach().requires_grad_(w) for t, w in zip(tensors, wanted)]
    out = sk.prefix_attention(*inputs, **kwargs, backend="cpu")
    with RecordBackwardCalls():
        torch.autograd.grad(out.sum(), [t for t in inputs if t.requires_grad])
    assert calls == [expected_flags]
