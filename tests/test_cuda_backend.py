"""The cuda backend's Python side on any machine: availability, refusals with reasons, and how
``auto`` treats it. (Kernel numerics: test_cuda_emulation.py on the CPU, test_cuda_gpu.py on a GPU.)"""
import warnings

import pytest
import torch

import softprompt_kernels as sk
from softprompt_kernels.ops import backends
from softprompt_kernels.ops.prefix_attention import validate
from softprompt_kernels.ops.prefix_attention.cuda import CudaBackend


def _args(Lq=1, D=64, dtype=torch.bfloat16, requires_grad=False, device="cpu"):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)

    return [rand(2, 4, Lq, D), rand(2, 2, 40, D), rand(2, 2, 40, D), rand(1, 2, 8, D), rand(1, 2, 8, D)]


def _named(tensors):
    return dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), tensors))


def test_cuda_backend_is_listed_with_a_reason_when_unusable():
    status = sk.backend_status()
    assert "cuda" in status
    if not torch.cuda.is_available():
        assert status["cuda"] and "cuda" not in sk.available_backends()


def test_cpu_tensors_are_refused_naming_the_device():
    with pytest.raises(sk.BackendNotSupportedError, match="needs cuda tensors, got cpu"):
        sk.prefix_attention(*_args(), backend="cuda")


@pytest.mark.parametrize("kwargs, expected", [
    (dict(D=80), "head dims (64, 128, 256), got 80"),
    (dict(D=32), "head dims (64, 128, 256), got 32"),
    (dict(dtype=torch.float32), "bfloat16 or float16, got torch.float32"),
    (dict(dtype=torch.float64), "bfloat16 or float16, got torch.float64"),
    (dict(requires_grad=True), "forward-only"),
])
def test_refusal_reasons_name_what_is_wrong(kwargs, expected):
    reasons = sk.not_supported_reasons("cuda", *_args(**kwargs))
    assert any(expected in r for r in reasons), reasons


def test_gradients_disabled_lifts_the_forward_only_refusal():
    with torch.no_grad():
        reasons = sk.not_supported_reasons("cuda", *_args(requires_grad=True))
    assert not any("forward-only" in r for r in reasons)


def test_auto_prefers_cuda_for_decode_and_passes_prefill_to_triton():
    backend = CudaBackend()
    decode = validate(**_named(_args(Lq=16)))
    prefill = validate(**_named(_args(Lq=17)))
    assert backend.auto_declines(decode) is None
    assert "triton" in backend.auto_declines(prefill)
    order = backends.PRIORITY["prefix_attention"]["cuda"]
    assert order[0] == "cuda" and order.index("triton") < order.index("torch")


def test_auto_skips_a_declining_backend_without_a_fallback_warning(monkeypatch):
    class Declining(backends.Backend):
        op = "prefix_attention"
        name = "declining-test"

        def auto_declines(self, inputs):
            return "another backend is preferred"

    monkeypatch.setitem(backends._BACKENDS["prefix_attention"], Declining.name, Declining())
    monkeypatch.setitem(backends.PRIORITY["prefix_attention"], "cpu", (Declining.name, "cpu", "torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sk.resolve_backend(*_args(dtype=torch.float32)) == "cpu"


def test_auto_on_cpu_never_picks_cuda():
    assert sk.resolve_backend(*_args()) == "cpu"
