"""insert_prompt on the CPU: the torch reference and the fused cpu kernel against an independent float64 oracle,
gradients, torch.compile (opcheck: test_opcheck.py), determinism, and one test per rejection (each naming the argument)."""
import warnings

import pytest
import torch

import softprompt_kernels as sk
from softprompt_kernels import BackendNotSupportedError, InvalidArgumentError, InvalidDtypeError, PerformanceWarning
from softprompt_kernels.ops import backends
from softprompt_kernels.ops.insert_prompt import fused

CPU_FUSED = fused.unavailable_reason("cpu")
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(CPU_FUSED is not None, reason=str(CPU_FUSED)))]
# Largest relative error of a value or gradient summed (or rounded) in each dtype: torch's embedding_backward
# adds repeated ids in the weight's dtype, a few roundings in bfloat16.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
OPS = torch.ops.softprompt_kernels


def oracle(input_ids, weight, prompt):
    """float64 ``cat(prompt expanded over the batch, weight[input_ids])``: PEFT's formulation, nothing shared."""
    prompt = prompt.reshape(-1, weight.shape[1]).double()
    return torch.cat([prompt.expand(input_ids.shape[0], -1, -1), weight.double()[input_ids.long()]], dim=1)


def make(B=3, k=4, n=5, d=8, V=11, dtype=torch.float32, prompt_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, n), generator=gen)
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64).to(dtype)
    prompt = torch.randn(k, d, generator=gen, dtype=torch.float64).to(prompt_dtype or dtype)
    return ids, weight, prompt


def relative(a, b):
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def grads_of(fn, ids, weight, prompt, grad_out):
    weight, prompt = weight.detach().requires_grad_(), prompt.detach().requires_grad_()
    out = fn(ids, weight, prompt)
    out.backward(grad_out.to(out.dtype))
    return out, weight.grad, prompt.grad


SHAPES = [dict(), dict(B=1), dict(k=0), dict(n=0), dict(B=0), dict(k=1, n=1, d=1), dict(B=4, k=20, n=33, d=100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) or "base")
def test_forward_is_exact(backend, dtype, shape):
    ids, weight, prompt = make(dtype=dtype, **shape)
    out = sk.insert_prompt(ids, weight, prompt, backend=backend)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, oracle(ids, weight, prompt).to(dtype))  # a copy: bit-exact


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype,prompt_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) or "base")
def test_gradients_match_oracle(backend, weight_dtype, prompt_dtype, shape):
    ids, weight, prompt = make(dtype=weight_dtype, prompt_dtype=prompt_dtype, **shape)
    ids[:, :2] = 3  # repeated ids: their weight gradients add up
    grad_out = torch.randn(ids.shape[0], prompt.shape[0] + ids.shape[1], weight.shape[1], dtype=torch.float64)
    grad_out = grad_out.to(weight_dtype)  # what the op receives
    out, dw, dp = grads_of(lambda i, w, p: sk.insert_prompt(i, w, p, backend=backend), ids, weight, prompt, grad_out)
    ref_out, ref_dw, ref_dp = grads_of(oracle, ids, weight.double(), prompt.double(), grad_out.double())
    assert torch.equal(out, ref_out.to(weight_dtype))
    assert dp.dtype == prompt_dtype and dp.shape == prompt.shape
    assert dw.dtype == weight_dtype and dw.shape == weight.shape
    # fused: the prompt gradient is accumulated in float32 (float64 for float64), then rounded to the prompt's dtype
    accumulated = torch.float64 if weight_dtype == torch.float64 else torch.float32
    dp_tol = max(TOL[prompt_dtype], TOL[accumulated if backend == "cpu" else weight_dtype])
    assert relative(dp, ref_dp) <= dp_tol
    assert relative(dw, ref_dw) <= TOL[weight_dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_with_leading_batch_dim_gets_grad_in_its_shape(backend):
    ids, weight, prompt = make()
    prompt3 = prompt[None].clone().requires_grad_()
    out = sk.insert_prompt(ids, weight, prompt3, backend=backend)
    assert torch.equal(out, oracle(ids, weight, prompt).float())
    out.sum().backward()  # a broadcast (stride 0) gradient
    torch.testing.assert_close(prompt3.grad, torch.full_like(prompt3, ids.shape[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids_kind", ["int32", "transposed", "strided"])
def test_index_dtypes_and_layouts(backend, ids_kind):
    _, weight, prompt = make()
    base = torch.randint(0, weight.shape[0], (6, 10))
    ids = {"int32": base.int(), "transposed": base.t(), "strided": base[::2, 1::3]}[ids_kind]
    assert ids_kind == "int32" or not ids.is_contiguous()
    weight = weight.requires_grad_()
    out = sk.insert_prompt(ids, weight, prompt, backend=backend)
    assert torch.equal(out, oracle(ids, weight.detach(), prompt).float())
    out.sum().backward()
    expected = torch.bincount(ids.reshape(-1).long(), minlength=weight.shape[0]).float()[:, None].expand_as(weight)
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_view", "transposed"])
def test_weight_layouts(backend, layout):
    ids, _, prompt = make(d=8, V=11)
    big = torch.randn(11, 20)
    weight = big[:, 3:11] if layout == "row_view" else torch.randn(8, 11).t()
    out = sk.insert_prompt(ids, weight, prompt, backend=backend)
    assert torch.equal(out, oracle(ids, weight, prompt).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    ids, weight, prompt = make(B=2, k=3, n=4, d=5, V=7, dtype=torch.float64)
    ids[0, :2] = 1
    weight.requires_grad_(), prompt.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, p: sk.insert_prompt(ids, w, p, backend=backend), (weight, prompt))
    assert torch.autograd.gradgradcheck(lambda w, p: sk.insert_prompt(ids, w, p, backend=backend), (weight, prompt))


def test_auto_uses_the_fused_cpu_kernel_without_warning():
    if CPU_FUSED is not None:
        pytest.skip(CPU_FUSED)
    ids, weight, prompt = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sk.insert_prompt(ids, weight, prompt.requires_grad_())
    assert "insert_prompt_fwd" in type(out.grad_fn).__name__


def test_auto_warns_when_the_fused_kernel_refuses(monkeypatch):
    ids, weight, prompt = make()
    cpu = backends.get_backend("cpu", "insert_prompt")
    monkeypatch.setattr(cpu, "not_supported_reasons", lambda inputs: ["refused for the test"])
    monkeypatch.setattr("softprompt_kernels.common._warned", set())
    with pytest.warns(PerformanceWarning, match="refused for the test"):
        out = sk.insert_prompt(ids, weight, prompt)
    assert torch.equal(out, oracle(ids, weight, prompt).float())


@pytest.mark.skipif(CPU_FUSED is not None, reason=str(CPU_FUSED))
def test_backward_is_deterministic_across_thread_counts():
    ids, weight, prompt = make(B=37, k=9, n=3, d=300)
    grad_out = torch.randn(37, 12, 300)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(OPS.insert_prompt_bwd(grad_out, 9))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    assert results[0].dtype == torch.float32
    torch.testing.assert_close(results[0].double(), grad_out[:, :9].double().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(CPU_FUSED is not None, reason=str(CPU_FUSED))
def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    ids, weight, prompt = make(dtype=torch.float32)
    prompt = prompt.requires_grad_()

    def step(ids, weight, prompt):
        out = sk.insert_prompt(ids, weight, prompt)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, weight, prompt)
    (grad,) = torch.autograd.grad(loss, prompt)
    eager_loss = step(ids, weight, prompt)
    (eager_grad,) = torch.autograd.grad(eager_loss, prompt)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.skipif(CPU_FUSED is not None, reason=str(CPU_FUSED))
def test_torch_compile_inductor_forward():
    torch._dynamo.reset()
    ids, weight, prompt = make()
    compiled = torch.compile(lambda i, w, p: sk.insert_prompt(i, w, p) * 2, fullgraph=True)
    assert torch.equal(compiled(ids, weight, prompt), 2 * oracle(ids, weight, prompt).float())


# --- rejections: one test each, the message names the argument

def _raises(exc, match, **over):
    ids, weight, prompt = make()
    args = dict(input_ids=ids, weight=weight, prompt=prompt)
    args.update(over)
    with pytest.raises(exc, match=match):
        sk.insert_prompt(args.pop("input_ids"), args.pop("weight"), args.pop("prompt"), **args)


def test_rejects_input_ids_not_a_tensor():
    _raises(InvalidDtypeError, "input_ids", input_ids=[[1, 2]])


def test_rejects_input_ids_rank():
    _raises(InvalidArgumentError, r"input_ids must be a \[B, n\]", input_ids=torch.tensor([1, 2]))


def test_rejects_input_ids_dtype():
    _raises(InvalidDtypeError, "input_ids must be int32 or int64", input_ids=torch.ones(2, 3))


def test_rejects_weight_rank():
    _raises(InvalidArgumentError, r"weight must be the \[V, d\]", weight=torch.randn(11, 8, 1))


def test_rejects_weight_dtype():
    _raises(InvalidDtypeError, "weight must be float16", weight=torch.ones(11, 8, dtype=torch.int64))


def test_rejects_prompt_width():
    _raises(InvalidArgumentError, r"prompt must have shape \[k, d=8\]", prompt=torch.randn(4, 7))


def test_rejects_prompt_rank():
    _raises(InvalidArgumentError, "prompt must have shape", prompt=torch.randn(2, 4, 8))


def test_rejects_prompt_dtype():
    _raises(InvalidDtypeError, "prompt must be float16", prompt=torch.ones(4, 8, dtype=torch.int32))


def test_rejects_input_ids_on_another_device():
    _raises(InvalidArgumentError, "input_ids must be on weight's device", input_ids=torch.zeros(2, 3, dtype=torch.long,
                                                                                              device="meta"))


def test_rejects_prompt_on_another_device():
    _raises(InvalidArgumentError, "prompt must be on weight's device", prompt=torch.randn(4, 8, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [11, -1])
def test_rejects_ids_out_of_range(backend, bad):
    ids = torch.tensor([[0, 1], [bad, 2]])
    _raises(InvalidArgumentError, r"input_ids must lie in \[0, V=11\)", input_ids=ids, backend=backend)


@pytest.mark.skipif(CPU_FUSED is not None, reason=str(CPU_FUSED))
def test_cpu_kernel_rejects_ids_out_of_range_without_python_validation():
    _raises(ValueError, r"input_ids must lie in \[0, V=11\)", input_ids=torch.tensor([[0, 11]]), backend="cpu",
            validate=False)


def test_rejects_unknown_backend():
    _raises(InvalidArgumentError, "backend must be", backend="triton")


def test_rejects_cuda_backend_for_cpu_tensors():
    _raises(BackendNotSupportedError, "backend='cuda'.*cuda tensors", backend="cuda")


@pytest.mark.skipif(CPU_FUSED is not None, reason=str(CPU_FUSED))
@pytest.mark.parametrize("call,match", [
    (lambda i, w, p: OPS.insert_prompt_fwd(i[0], w, p), "input_ids must be a"),
    (lambda i, w, p: OPS.insert_prompt_fwd(i.float(), w, p), "input_ids must be int32 or int64"),
    (lambda i, w, p: OPS.insert_prompt_fwd(i, w[0], p), "weight must be the"),
    (lambda i, w, p: OPS.insert_prompt_fwd(i, w.int(), p), "weight must be float16"),
    (lambda i, w, p: OPS.insert_prompt_fwd(i, w, p[None]), "prompt must have shape"),
    (lambda i, w, p: OPS.insert_prompt_bwd(torch.randn(2, 3, 8), 4), "k must lie in"),
    (lambda i, w, p: OPS.insert_prompt_bwd(torch.randn(2, 3), 1), "grad_out must have shape"),
], ids=["ids-rank", "ids-dtype", "weight-rank", "weight-dtype", "prompt-shape", "bwd-k", "bwd-rank"])
def test_ops_reject_bad_arguments_directly(call, match):
    ids, weight, prompt = make()
    with pytest.raises((ValueError, TypeError), match=match):
        call(ids, weight, prompt)


# --- insert_prompts: a prompt per row (multitask prompt tuning), one insert_prompt call per distinct prompt

from softprompt_kernels.ops import insert_prompts  # noqa: E402


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt_ids", [[2, 0, 2, 1, 0], [1, 1, 1, 1, 1], [0, 1, 2, 3, 4]], ids=["mixed", "one", "own"])
def test_insert_prompts_gives_each_row_its_prompt(backend, prompt_ids):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (5, 6), generator=gen)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    prompts = torch.randn(5, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor(prompt_ids)
    out = insert_prompts(ids, weight, prompts, rows, backend=backend)
    expected = torch.cat([prompts[rows], weight[ids]], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, [weight, prompts], grad_out)
    want = torch.autograd.grad(expected, [weight, prompts], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda w, p: insert_prompts(ids, w, p, rows, backend=backend), (weight, prompts))


def test_insert_prompts_without_prompt_ids_takes_one_prompt():
    ids, weight, prompt = make()
    torch.testing.assert_close(insert_prompts(ids, weight, prompt[None]), sk.insert_prompt(ids, weight, prompt))


@pytest.mark.parametrize("prompts, prompt_ids, match", [
    (torch.randn(4, 8), None, r"prompts must be a \[P, k, d\] tensor"),
    (torch.randn(2, 4, 8), None, "prompt_ids is required with P=2"),
    (torch.randn(2, 4, 8), torch.tensor([0, 1]), r"prompt_ids must be an int32/int64 tensor \[B=3\]"),
    (torch.randn(2, 4, 8), torch.tensor([0.0, 1.0, 0.0]), r"prompt_ids must be an int32/int64 tensor \[B=3\]"),
    (torch.randn(2, 4, 8), torch.tensor([0, 2, 1]), r"prompt_ids must lie in \[0, P=2\)"),
    (torch.randn(2, 4, 8), torch.tensor([0, -1, 1]), r"prompt_ids must lie in \[0, P=2\)"),
])
def test_insert_prompts_rejects_bad_arguments(prompts, prompt_ids, match):
    ids, weight, _ = make()
    with pytest.raises(InvalidArgumentError, match=match):
        insert_prompts(ids, weight, prompts, prompt_ids)
