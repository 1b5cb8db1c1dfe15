"""``torch.library.opcheck`` on every op of the extension, for every backend that runs on this machine.

Ops: the C++ pair ``prefix_attention_fwd/bwd`` (cpu kernel; cuda kernel forward), the Triton pair
``triton_prefix_attention_fwd/bwd`` (on a GPU, or in Triton's interpreter on CPU tensors) and the
insertion pair ``insert_prompt_fwd/bwd`` (cpu, cuda). The GPU half runs in benchmarks/device_check.sh.
A last test fails when an op is registered that no case here checks.
"""
import pytest
import torch

import softprompt_kernels as sk
from helpers import Case, backward_op_args, forward_op_args, make_inputs
from softprompt_kernels.ops import extension
from softprompt_kernels.triton.common import TRITON_IMPORT_ERROR, interpreting

if TRITON_IMPORT_ERROR is None:
    from softprompt_kernels.ops.prefix_attention.triton import DETERMINISTIC

OPS = torch.ops.softprompt_kernels
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TRITON_HERE = TRITON_IMPORT_ERROR is None and (CUDA or interpreting())
triton_only = pytest.mark.skipif(not TRITON_HERE, reason=f"triton cannot run here: {TRITON_IMPORT_ERROR}")

CASES = [
    Case(2, 4, 2, 3, 5, 2, 3, 8, prompt_ids=[1, -1], prefix_lens=[2, 3], padding=[[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    Case(2, 2, 2, 4, 4, 1, 3, 4, causal=False),
    Case(1, 2, 1, 1, 6, 1, 0, 8),
]
WANTED = [(True, True), (False, True), (True, False)]  # (seq_grads, prefix_grads)
# window, softcap and sinks (docs/DESIGN.md section 2) on top of CASES[0]
FEATURES = [(3, None, False), (None, 0.8, False), (None, None, True), (2, 1.5, True)]
OFFSETS = torch.tensor([2, 0])  # CASES[0] has two rows of five keys
checked_ops = set()


def _named(case, dtype, device="cpu", **extra):
    """A forward call's arguments by name (scale 0.3)."""
    (q, k, v, pk, pv), kw = make_inputs(case, dtype=dtype, device=device)
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, scale=0.3, **kw, **extra)


def _args(case, dtype, device="cpu", **extra):
    return forward_op_args([], **_named(case, dtype, device, **extra))


def _backward_args(forward_op, named, extra=(), **flags):
    """A backward call's arguments: the forward run on ``named`` (detached), random upstream gradients."""
    detached = {name: a.detach() if isinstance(a, torch.Tensor) else a for name, a in named.items()}
    out, lse = forward_op(*forward_op_args([], **detached))
    return backward_op_args(extra, grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse), out=out, lse=lse,
                            **detached, **flags)


def _opcheck(name, args):
    checked_ops.add(name)
    torch.library.opcheck(getattr(OPS, name).default, args)


# --- the C++ ops on the cpu kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_prefix_attention_fwd(case, dtype):
    _opcheck("prefix_attention_fwd", _args(case, dtype))


@pytest.mark.parametrize("window, softcap, sinks", FEATURES, ids=str)
def test_cpu_prefix_attention_features(window, softcap, sinks):
    features = dict(window=window, softcap=softcap, sinks=torch.randn(CASES[0].Hq, requires_grad=True) if sinks
                    else None, prefix_offsets=OFFSETS if window is not None else None)
    named = _named(CASES[0], torch.float32, **features)
    _opcheck("prefix_attention_fwd", forward_op_args([], **named))
    _opcheck("prefix_attention_bwd", _backward_args(OPS.prefix_attention_fwd, named))


@pytest.mark.parametrize("wanted", WANTED, ids=str)
def test_cpu_prefix_attention_bwd(wanted):
    _opcheck("prefix_attention_bwd", _backward_args(OPS.prefix_attention_fwd, _named(CASES[0], torch.float32),
                                                    seq_grads=wanted[0], prefix_grads=wanted[1]))


@pytest.mark.parametrize("case", [dict(), dict(k=0), dict(n=0), dict(prompt_dtype=torch.float64)], ids=str)
def test_cpu_insert_prompt_fwd(case):
    ids, weight, prompt = _insertion_args(**case)
    _opcheck("insert_prompt_fwd", (ids, weight, prompt))
    _opcheck("insert_prompt_fwd", (ids.int(), weight.requires_grad_(), prompt.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_insert_prompt_bwd(dtype):
    grad_out = torch.randn(3, 9, 8, dtype=dtype)
    _opcheck("insert_prompt_bwd", (grad_out, 4))
    _opcheck("insert_prompt_bwd", (grad_out.transpose(0, 1)[:, :3].transpose(0, 1), 2))


def _insertion_args(B=3, k=4, n=5, d=8, V=11, dtype=torch.float32, prompt_dtype=None, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, n), generator=gen).to(device)
    weight = torch.randn(V, d, generator=gen).to(device, dtype)
    prompt = torch.randn(k, d, generator=gen).to(device, prompt_dtype or dtype)
    return ids, weight, prompt


# --- the Triton ops (a GPU, or the interpreter on CPU tensors)

def _triton_device():
    return "cuda" if CUDA and not interpreting() else "cpu"


@triton_only
@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_triton_prefix_attention_fwd(case):
    dtype = torch.bfloat16 if _triton_device() == "cuda" else torch.float32
    _opcheck("triton_prefix_attention_fwd", _args(case, dtype, _triton_device()))


@triton_only
def test_triton_prefix_attention_features():
    dtype = torch.bfloat16 if _triton_device() == "cuda" else torch.float32
    named = _named(CASES[0], dtype, _triton_device(), window=2, softcap=1.5,
                   sinks=torch.randn(CASES[0].Hq, device=_triton_device(), requires_grad=True),
                   prefix_offsets=OFFSETS.to(_triton_device()))
    _opcheck("triton_prefix_attention_fwd", forward_op_args([], **named))
    _opcheck("triton_prefix_attention_bwd", _backward_args(OPS.triton_prefix_attention_fwd, named, DETERMINISTIC,
                                                           deterministic=True))


@triton_only
@pytest.mark.parametrize("wanted", WANTED, ids=str)
def test_triton_prefix_attention_bwd(wanted):
    dtype = torch.bfloat16 if _triton_device() == "cuda" else torch.float32
    args = _backward_args(OPS.triton_prefix_attention_fwd, _named(CASES[0], dtype, _triton_device()), DETERMINISTIC,
                          deterministic=True, seq_grads=wanted[0], prefix_grads=wanted[1])
    _opcheck("triton_prefix_attention_bwd", args)


# --- prefix-only attention (Lk = 0, non-causal: docs/DESIGN.md section 2) on both op pairs

PREFIX_ONLY = Case(3, 4, 2, 5, 0, 2, 4, 8, causal=False, prompt_ids=[1, -1, 0], prefix_lens=[4, 3])


@pytest.mark.parametrize("wanted", WANTED, ids=str)
def test_cpu_prefix_only_attention(wanted):
    named = _named(PREFIX_ONLY, torch.float32)
    _opcheck("prefix_attention_fwd", forward_op_args([], **named))
    _opcheck("prefix_attention_bwd", _backward_args(OPS.prefix_attention_fwd, named, seq_grads=wanted[0],
                                                    prefix_grads=wanted[1]))


@triton_only
@pytest.mark.parametrize("wanted", WANTED, ids=str)
def test_triton_prefix_only_attention(wanted):
    dtype = torch.bfloat16 if _triton_device() == "cuda" else torch.float32
    named = _named(PREFIX_ONLY, dtype, _triton_device())
    _opcheck("triton_prefix_attention_fwd", forward_op_args([], **named))
    _opcheck("triton_prefix_attention_bwd", _backward_args(OPS.triton_prefix_attention_fwd, named, DETERMINISTIC,
                                                           deterministic=True, seq_grads=wanted[0],
                                                           prefix_grads=wanted[1]))


# --- CUDA kernels (GPU only; the device script runs these)

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("Lq", [1, 16, 40], ids=["decode", "decode-16", "prefill"])
def test_cuda_prefix_attention_fwd(Lq):
    if not extension.extension_has_cuda():
        pytest.fail("softprompt_kernels._C was built without CUDA sources on a machine with a GPU")
    case = Case(2, 4, 2, Lq, 48, 2, 5, 64, prompt_ids=[1, -1], prefix_lens=[5, 2])
    _opcheck("prefix_attention_fwd", _args(case, torch.bfloat16, "cuda"))
    if Lq <= 16:  # the decode kernel has the modern-attention features (prefill goes to Triton for them)
        sinks = torch.randn(4, device="cuda")
        _opcheck("prefix_attention_fwd", _args(case, torch.bfloat16, "cuda", window=7, softcap=1.5, sinks=sinks))


@gpu
@pytest.mark.gpu
def test_cuda_insert_prompt():
    ids, weight, prompt = _insertion_args(d=64, V=50, dtype=torch.bfloat16, prompt_dtype=torch.float32, device="cuda")
    _opcheck("insert_prompt_fwd", (ids, weight, prompt.requires_grad_()))
    _opcheck("insert_prompt_bwd", (torch.randn(3, 9, 64, device="cuda"), 4))


def test_every_registered_op_is_checked():
    """Runs last in this file: every op of the namespace had an opcheck above (on this machine's devices)."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("softprompt_kernels::")}
    assert registered >= {"prefix_attention_fwd", "prefix_attention_bwd", "insert_prompt_fwd", "insert_prompt_bwd"}
    if not TRITON_HERE:
        registered -= {"triton_prefix_attention_fwd", "triton_prefix_attention_bwd"}
    assert registered <= checked_ops, f"ops without an opcheck: {sorted(registered - checked_ops)}"
    assert sk.available_backends()  # the package imported and registered its backends
