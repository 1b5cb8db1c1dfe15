"""insert_prompt's fused CUDA kernel against the float64 oracle, and its rejections (needs a CUDA device).

Tolerance rule for gradients (docs/DESIGN.md section 6): max|fused - ref| <= 2 * max|torch same dtype - ref| + floor,
with ref the float64 oracle; the forward is a copy, so it must be bit-exact.
"""
import pytest
import torch

import softprompt_kernels as sk
from helpers import assert_flash_rule
from softprompt_kernels import BackendNotSupportedError, InvalidArgumentError, PerformanceWarning, common

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
OPS = torch.ops.softprompt_kernels
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def oracle(input_ids, weight, prompt):
    prompt = prompt.double()
    return torch.cat([prompt.expand(input_ids.shape[0], -1, -1), weight.double()[input_ids.long()]], dim=1)


def make(B=4, k=20, n=37, d=384, V=1000, dtype=torch.bfloat16, prompt_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, n), generator=gen).cuda()
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64).to("cuda", dtype)
    prompt = torch.randn(k, d, generator=gen, dtype=torch.float64).to("cuda", prompt_dtype)
    return ids, weight, prompt


def grads(backend, ids, weight, prompt, grad_out):
    weight, prompt = weight.detach().requires_grad_(), prompt.detach().requires_grad_()
    if backend == "oracle":
        out = oracle(ids, weight, prompt)
    else:
        out = sk.insert_prompt(ids, weight, prompt, backend=backend)
    out.backward(grad_out.to(out.dtype))
    return out, weight.grad, prompt.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [384, 768, 100])
def test_cuda_matches_oracle(dtype, d):
    ids, weight, prompt = make(d=d, dtype=dtype)
    ids[:, :3] = 7  # repeated ids
    grad_out = torch.randn(ids.shape[0], prompt.shape[0] + ids.shape[1], d, device="cuda", dtype=torch.float64)
    grad_out = grad_out.to(dtype)
    out, dw, dp = grads("cuda", ids, weight, prompt, grad_out)
    ref_out, ref_dw, ref_dp = grads("oracle", ids, weight.double(), prompt.double(), grad_out.double())
    _, torch_dw, torch_dp = grads("torch", ids, weight, prompt, grad_out)
    assert torch.equal(out, ref_out.to(dtype))
    assert dp.dtype == prompt.dtype and dw.dtype == dtype
    assert_flash_rule("dp", dp, torch_dp, ref_dp)
    assert_flash_rule("dw", dw, torch_dw, ref_dw)


@pytest.mark.parametrize("shape", [dict(B=0), dict(k=0), dict(n=0), dict(B=1, k=1, n=1, d=8)], ids=str)
def test_cuda_edge_shapes(shape):
    ids, weight, prompt = make(**shape)
    prompt.requires_grad_()
    out = sk.insert_prompt(ids, weight, prompt, backend="cuda")
    assert torch.equal(out, oracle(ids, weight, prompt.detach()).to(weight.dtype))
    out.float().sum().backward()
    torch.testing.assert_close(prompt.grad, torch.full_like(prompt, ids.shape[0]))


def test_cuda_misaligned_weight_and_strided_int32_ids():
    ids, weight, prompt = make(d=384, dtype=torch.bfloat16)
    shifted = torch.empty(weight.numel() + 1, dtype=weight.dtype, device="cuda")[1:].view_as(weight)
    shifted.copy_(weight)  # rows 16-byte multiples, base address not: the scalar path
    view = ids.int().t()[::2].t()  # [B, ceil(n / 2)] int32, non-contiguous
    out = sk.insert_prompt(view, shifted, prompt, backend="cuda")
    assert torch.equal(out, oracle(view, weight, prompt).to(weight.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_bad_ids_without_validation_give_nan_rows(dtype):
    ids, weight, prompt = make(B=2, n=5, V=50, dtype=dtype, prompt_dtype=dtype)
    ids[0, 1], ids[1, 4] = 50, -3
    out = sk.insert_prompt(ids, weight, prompt, backend="cuda", validate=False)
    k = prompt.shape[0]
    assert out[0, k + 1].isnan().all() and out[1, k + 4].isnan().all()
    assert not out[0, k + 2].isnan().any()


def test_cuda_backward_is_deterministic():
    grad_out = torch.randn(64, 40, 768, device="cuda", dtype=torch.bfloat16)
    first = OPS.insert_prompt_bwd(grad_out, 20)
    assert first.dtype == torch.float32
    for _ in range(3):
        assert torch.equal(OPS.insert_prompt_bwd(grad_out, 20), first)


def test_cuda_auto_picks_fused_and_falls_back_for_float64():
    ids, weight, prompt = make(dtype=torch.float32)
    out = sk.insert_prompt(ids, weight, prompt.requires_grad_())
    assert "insert_prompt_fwd" in type(out.grad_fn).__name__
    common._warned.clear()
    with pytest.warns(PerformanceWarning, match="float64"):
        out = sk.insert_prompt(ids, weight.double(), prompt)
    assert torch.equal(out, oracle(ids, weight, prompt))


def test_cuda_compile():
    ids, weight, prompt = make(B=2, k=3, n=5, d=64, V=50)
    prompt.requires_grad_()
    torch._dynamo.reset()
    step = torch.compile(lambda i, w, p: sk.insert_prompt(i, w, p).float().square().sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(step(ids, weight, prompt), prompt)
    (eager,) = torch.autograd.grad(sk.insert_prompt(ids, weight, prompt).float().square().sum(), prompt)
    torch.testing.assert_close(grad, eager)


# --- rejections, each naming the argument

def test_rejects_ids_on_the_cpu():
    ids, weight, prompt = make()
    with pytest.raises(InvalidArgumentError, match="input_ids must be on weight's device"):
        sk.insert_prompt(ids.cpu(), weight, prompt, backend="cuda")


def test_rejects_prompt_on_the_cpu():
    ids, weight, prompt = make()
    with pytest.raises(InvalidArgumentError, match="prompt must be on weight's device"):
        sk.insert_prompt(ids, weight, prompt.cpu())


def test_rejects_cpu_tensors_for_the_cuda_backend():
    ids, weight, prompt = make()
    with pytest.raises(BackendNotSupportedError, match="backend='cuda'.*cuda tensors"):
        sk.insert_prompt(ids.cpu(), weight.cpu(), prompt.cpu(), backend="cuda")


def test_rejects_float64_for_the_cuda_backend():
    ids, weight, prompt = make(dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="float64"):
        sk.insert_prompt(ids, weight, prompt, backend="cuda")


def test_rejects_ids_out_of_range_when_validating():
    ids, weight, prompt = make(V=50)
    ids[1, 3] = 50
    with pytest.raises(InvalidArgumentError, match=r"input_ids must lie in \[0, V=50\)"):
        sk.insert_prompt(ids, weight, prompt, backend="cuda")


@pytest.mark.parametrize("call,match", [
    (lambda i, w, p: OPS.insert_prompt_fwd(i.cpu(), w, p), "input_ids must be on weight's device"),
    (lambda i, w, p: OPS.insert_prompt_fwd(i, w, p.cpu()), "prompt must be on weight's device"),
    (lambda i, w, p: OPS.insert_prompt_fwd(i, w.double(), p), "weight must be float32, bfloat16 or float16"),
    (lambda i, w, p: OPS.insert_prompt_bwd(torch.randn(2, 3, 8, device="cuda", dtype=torch.float64), 1),
     "grad_out must be float32, bfloat16 or float16"),
    (lambda i, w, p: OPS.insert_prompt_bwd(torch.randn(2, 3, 8, device="cuda"), 4), "k must lie in"),
], ids=["ids-device", "prompt-device", "weight-fp64", "grad-fp64", "bwd-k"])
def test_cuda_ops_reject_bad_arguments_directly(call, match):
    ids, weight, prompt = make()
    with pytest.raises((ValueError, TypeError), match=match):
        call(ids, weight, prompt)
