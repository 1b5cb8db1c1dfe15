"""The cuda backend on a CUDA GPU (skipped without one): decode and prefill kernels against a float32
reference under FlashAttention's tolerance rule, the lse, CUDA-graph capture of decode, auto's choice,
and refusals of bad inputs."""
import pytest
import torch

import softprompt_kernels as sk
from helpers import assert_flash_rule, forward_op_args, gpu_inputs

pytestmark = pytest.mark.gpu

DECODE_SHAPES = [
    # B, Hq, Hkv, Lq, Lk, P, K, D, causal, padded, multi-prompt
    (8, 32, 8, 1, 4096, 1, 128, 128, True, False, False),   # serving shape, one prompt
    (8, 32, 8, 1, 4096, 64, 128, 128, True, True, True),    # 8 distinct prompts of a bank of 64, left padding
    (1, 32, 8, 1, 32768, 1, 128, 128, True, False, False),  # long cache: many splits + combine
    (3, 8, 8, 1, 777, 3, 33, 64, True, True, True),         # MHA, odd lengths, ids with -1, prefix_lens
    (2, 16, 2, 4, 1000, 2, 16, 256, True, True, True),      # speculative decode, group 8, D=256
    (2, 4, 1, 16, 300, 1, 0, 128, False, True, False),      # Lq = 16, K = 0, bidirectional
]
PREFILL_SHAPES = [
    (2, 8, 2, 512, 512, 1, 128, 128, True, False, False),
    (4, 8, 8, 300, 300, 3, 77, 64, True, True, True),
    (1, 4, 2, 130, 200, 2, 33, 256, True, True, True),      # chunked prefill: Lq < Lk
    (2, 4, 4, 17, 17, 1, 5, 128, False, False, False),      # just above the decode limit
]


def _inputs(shape, dtype, seed=0):
    tensors, kwargs, _ = gpu_inputs(shape, dtype, seed)
    return tensors, kwargs


def _assert_flash_rule(shape, dtype):
    tensors, kwargs = _inputs(shape, dtype)
    with torch.no_grad():
        ref, ref_lse = sk.prefix_attention(*[t.float() for t in tensors], **kwargs, backend="torch", return_lse=True)
        ours, lse = sk.prefix_attention(*tensors, **kwargs, backend="cuda", return_lse=True)
        baseline = sk.prefix_attention(*tensors, **kwargs, backend="torch")
    assert ours.shape == ref.shape and ours.dtype == dtype
    assert_flash_rule("out", ours, baseline, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s[:8])))
def test_decode_flash_attention_tolerance_rule(shape, dtype):
    _assert_flash_rule(shape, dtype)


@pytest.mark.parametrize("features", [dict(window=300), dict(softcap=3.0), dict(window=50, softcap=2.0, sinks=True)],
                         ids=lambda f: "+".join(f))
@pytest.mark.parametrize("shape", [DECODE_SHAPES[1], DECODE_SHAPES[2], DECODE_SHAPES[4]],
                         ids=lambda s: "x".join(map(str, s[:8])))
def test_decode_features_flash_attention_tolerance_rule(shape, features):
    tensors, kwargs = _inputs(shape, torch.bfloat16)
    kwargs = dict(kwargs, **{k: v for k, v in features.items() if k != "sinks"})
    if features.get("sinks"):
        kwargs["sinks"] = torch.randn(shape[1], device="cuda")
    with torch.no_grad():
        ref, ref_lse = sk.prefix_attention(*[t.float() for t in tensors], **kwargs, backend="torch", return_lse=True)
        ours, lse = sk.prefix_attention(*tensors, **kwargs, backend="cuda", return_lse=True)
        baseline = sk.prefix_attention(*tensors, **kwargs, backend="torch")
    assert_flash_rule("out", ours, baseline, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "x".join(map(str, s[:8])))
def test_prefill_flash_attention_tolerance_rule(shape, dtype):
    _assert_flash_rule(shape, dtype)


def test_rows_that_see_nothing_get_zeros_and_minus_inf():
    tensors, kwargs = _inputs((2, 8, 2, 1, 64, 1, 8, 128, True, False, False), torch.bfloat16)
    kwargs["prompt_ids"] = torch.tensor([-1, 0], device="cuda")
    kwargs["key_padding_mask"] = torch.tensor([[False] * 64, [True] * 64], device="cuda")
    with torch.no_grad():
        out, lse = sk.prefix_attention(*tensors, **kwargs, backend="cuda", return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(out[1].float()).all()


def test_decode_can_be_captured_in_a_cuda_graph():
    tensors, kwargs = _inputs((2, 32, 8, 1, 32768, 4, 128, 128, True, True, True), torch.bfloat16)
    static = [t.clone() for t in tensors]
    with torch.no_grad():
        sk.prefix_attention(*static, **kwargs, backend="cuda")  # warm up (allocator, first launch)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = sk.prefix_attention(*static, **kwargs, backend="cuda")
        fresh, _ = _inputs((2, 32, 8, 1, 32768, 4, 128, 128, True, True, True), torch.bfloat16, seed=1)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager = sk.prefix_attention(*fresh, **kwargs, backend="cuda")
    torch.testing.assert_close(graph_out, eager, rtol=0, atol=0)


def test_auto_picks_cuda_for_decode_without_grad_and_triton_otherwise():
    tensors, kwargs = _inputs((2, 8, 2, 1, 256, 1, 16, 128, True, False, False), torch.bfloat16)
    with torch.no_grad():
        assert sk.resolve_backend(*tensors, **kwargs) == "cuda"
    long_q, kw = _inputs((2, 8, 2, 64, 256, 1, 16, 128, True, False, False), torch.bfloat16)
    assert sk.resolve_backend(*long_q, **kw) == "triton"
    with_grad = [t.requires_grad_() for t in tensors]
    assert sk.resolve_backend(*with_grad, **kwargs) == "triton"


def test_training_through_cuda_is_refused_with_a_pointer_to_triton():
    tensors, kwargs = _inputs((1, 2, 2, 1, 16, 1, 2, 64, True, False, False), torch.bfloat16)
    tensors = [t.requires_grad_() for t in tensors]
    with pytest.raises(sk.BackendNotSupportedError, match="forward-only"):
        sk.prefix_attention(*tensors, **kwargs, backend="cuda")
    out, lse = torch.ops.softprompt_kernels.prefix_attention_fwd(*forward_op_args(tensors, scale=0.125))
    with pytest.raises(NotImplementedError, match="forward-only"):
        out.float().sum().backward()


@pytest.mark.parametrize("change, match", [
    (lambda t: [x[..., :80].contiguous() for x in t], "head dims"),
    (lambda t: [x.float() for x in t], "bfloat16 or float16"),
    (lambda t: [t[0].cpu()] + t[1:], "device"),
])
def test_bad_inputs_are_refused_with_clear_messages(change, match):
    tensors, kwargs = _inputs((1, 2, 2, 1, 16, 1, 2, 128, True, False, False), torch.bfloat16)
    with pytest.raises(sk.InvalidArgumentError, match=match):
        sk.prefix_attention(*change(tensors), **kwargs, backend="cuda")


@pytest.mark.parametrize("change, match", [
    (lambda t: [x[..., :80].contiguous() for x in t], "head dims 64, 128 and 256"),
    (lambda t: [x.float() for x in t], "bfloat16 or float16"),
    (lambda t: [t[0]] + [x.cpu() for x in t[1:]], "device"),
])
def test_direct_op_calls_are_checked_in_cpp(change, match):
    tensors, _ = _inputs((1, 2, 2, 1, 16, 1, 2, 128, True, False, False), torch.bfloat16)
    with pytest.raises((ValueError, TypeError, NotImplementedError, RuntimeError), match=match):
        torch.ops.softprompt_kernels.prefix_attention_fwd(*forward_op_args(change(tensors), scale=0.125))
