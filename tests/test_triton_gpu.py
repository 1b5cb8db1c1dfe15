"""Triton backend on a CUDA GPU (skipped without one): FlashAttention's tolerance rule in fp16/bf16
at realistic sizes for the output and all five gradients, determinism, torch.compile."""
import pytest
import torch

import softprompt_kernels as sk
from helpers import assert_flash_rule, gpu_inputs

pytestmark = pytest.mark.gpu

SHAPES = [
    # B, Hq, Hkv, Lq, Lk, P, K, D, causal, padded, multi-prompt
    (2, 8, 2, 512, 512, 1, 128, 128, True, False, False),
    (4, 8, 8, 300, 300, 3, 77, 64, True, True, True),
    (2, 4, 1, 1, 1000, 2, 16, 128, True, True, True),      # decode
    (2, 4, 2, 257, 257, 1, 0, 80, False, True, False),     # K = 0, D not a power of two
    (1, 4, 2, 130, 130, 2, 33, 256, True, False, True),
]


def _inputs(shape, dtype, seed=0):
    return gpu_inputs(shape, dtype, seed, requires_grad=True)


def _run(backend, tensors, kwargs, grad):
    out = sk.prefix_attention(*tensors, **kwargs, backend=backend)
    grads = torch.autograd.grad(out, tensors, grad, allow_unused=True)  # K = 0: the torch path never uses the prefix
    return [out.detach()] + [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, tensors)]


CASES = [(shape, torch.bfloat16) for shape in SHAPES] + [(SHAPES[0], torch.float16), (SHAPES[1], torch.float16)]


@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda c: "x".join(map(str, c[:8])) if isinstance(c, tuple)
                         else str(c).replace("torch.", ""))
def test_flash_attention_tolerance_rule(shape, dtype):
    tensors, kwargs, grad = _inputs(shape, dtype)
    ref_inputs = [t.detach().float().requires_grad_() for t in tensors]
    reference = _run("torch", ref_inputs, kwargs, grad.float())
    ours = _run("triton", tensors, kwargs, grad)
    baseline = _run("torch", tensors, kwargs, grad)
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, a, b, ref in zip(names, ours, baseline, reference):
        assert_flash_rule(name, a, b, ref)


FEATURES = [dict(window=100), dict(softcap=2.0), dict(sinks=True), dict(window=37, softcap=5.0, sinks=True)]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]], ids=lambda s: "x".join(map(str, s[:8])))
def test_features_flash_attention_tolerance_rule(shape, features):
    """Sliding window, soft-capping and sinks (docs/DESIGN.md section 2), output and every gradient."""
    tensors, kwargs, grad = _inputs(shape, torch.bfloat16)
    kwargs = dict(kwargs, **{k: v for k, v in features.items() if k != "sinks"})
    sinks = torch.randn(shape[1], device="cuda", requires_grad=True) if features.get("sinks") else None

    def run(backend, xs, g):
        extra = {"sinks": xs[5]} if sinks is not None else {}
        out = sk.prefix_attention(*xs[:5], **kwargs, **extra, backend=backend)
        grads = torch.autograd.grad(out, xs, g, allow_unused=True)
        return [out.detach()] + [torch.zeros_like(t) if gr is None else gr.detach() for gr, t in zip(grads, xs)]

    leaves = tensors + ([sinks] if sinks is not None else [])
    reference = run("torch", [t.detach().float().requires_grad_() for t in leaves], grad.float())
    ours, baseline = run("triton", leaves, grad), run("torch", leaves, grad)
    for name, a, b, ref in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks"], ours, baseline, reference):
        assert_flash_rule(name, a, b, ref)


def test_float32_matches_float64_reference():
    shape = (2, 4, 2, 100, 130, 2, 20, 32, True, True, True)  # float32 runs up to head dim 32
    tensors, kwargs, grad = _inputs(shape, torch.float32)
    ours = _run("triton", tensors, kwargs, grad)
    reference = _run("torch", [t.detach().double().requires_grad_() for t in tensors], kwargs, grad.double())
    for a, ref in zip(ours, reference):
        scale = max(ref.abs().max().item(), 1e-6)
        assert (a.double() - ref).abs().max().item() <= 1e-4 * scale


def test_deterministic_mode_is_bitwise_reproducible():
    sk.set_prefix_grad_mode("deterministic")
    tensors, kwargs, grad = _inputs((8, 8, 2, 256, 256, 2, 128, 128, True, True, True), torch.bfloat16)
    first = _run("triton", tensors, kwargs, grad)
    second = _run("triton", tensors, kwargs, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_atomic_mode_matches_deterministic():
    tensors, kwargs, grad = _inputs((8, 8, 2, 256, 256, 2, 128, 128, True, True, True), torch.bfloat16)
    deterministic = _run("triton", tensors, kwargs, grad)
    sk.set_prefix_grad_mode("atomic")
    try:
        atomic = _run("triton", tensors, kwargs, grad)
    finally:
        sk.set_prefix_grad_mode("deterministic")
    for a, b in zip(atomic, deterministic):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_float32_with_large_head_dim_is_refused_with_a_reason():
    tensors, kwargs, _ = _inputs((1, 2, 2, 8, 8, 1, 2, 64, True, False, False), torch.float32)
    with pytest.raises(sk.BackendNotSupportedError, match="float32 with head dim 64"):
        sk.prefix_attention(*tensors, **kwargs, backend="triton")


def test_auto_picks_triton_on_cuda_and_compiles_fullgraph():
    tensors, kwargs, grad = _inputs((2, 8, 2, 128, 128, 1, 16, 64, True, False, False), torch.bfloat16)
    assert sk.resolve_backend(*tensors, **kwargs) == "triton"
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(q, k, v, pk, pv):
        return sk.prefix_attention(q, k, v, pk, pv, **kwargs).float().square().sum()

    loss = step(*tensors)
    grads = torch.autograd.grad(loss, tensors)
    eager = sk.prefix_attention(*tensors, **kwargs).float().square().sum()
    eager_grads = torch.autograd.grad(eager, tensors)
    torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
