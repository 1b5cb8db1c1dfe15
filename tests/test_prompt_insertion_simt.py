"""The CUDA prompt-insertion kernels, run on the CPU under the SIMT emulator (no GPU needed).

csrc/cuda/prompt_insertion.cu and tests/prompt_insertion_simt_driver.cpp are compiled by the host C++ compiler with
SOFTPROMPT_SIMT_EMULATION (tests/cuda_emulation/simt_emulation.h runs each block's threads as host threads) and
called through ctypes on torch tensors. This checks the kernels' indexing, the 16-byte/scalar path choice, the
grid-stride loops, NaN rows for bad ids and the backward's fixed-order reduction; timing and coalescing need a GPU
(tests/test_prompt_insertion_gpu.py).
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles the kernels with the host compiler first (about a minute)

ROOT = Path(__file__).resolve().parent.parent
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = list(CODES)
I64, PTR, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler for the SIMT emulation")
    out = tmp_path_factory.mktemp("simt") / "prompt_insertion_simt.so"
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DSOFTPROMPT_SIMT_EMULATION",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'cuda_emulation'}",
           "-x", "c++", str(ROOT / "csrc" / "cuda" / "prompt_insertion.cu"),
           "-x", "c++", str(ROOT / "tests" / "prompt_insertion_simt_driver.cpp"), "-o", str(out)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    lib.simt_insert_prompt_fwd.argtypes = [PTR, I64, I64, PTR, I64, I64, PTR, I64, PTR, I64, I64, I64, I64, INT, I64]
    lib.simt_insert_prompt_bwd.argtypes = [PTR, I64, I64, I64, PTR, I64, I64, I64, INT, I64]
    lib.simt_insert_prompt_vectorized.argtypes = [PTR, I64, PTR, I64, PTR, I64, I64, I64, I64, INT]
    return lib


def forward(lib, ids, weight, prompt, max_blocks=0):
    """out [B, k + n, d] from the emulated kernel; weight [V, d] (last dim contiguous), prompt [k, d] contiguous."""
    B, n = ids.shape
    k, d = prompt.shape
    out = torch.full((B, k + n, d), 7.0, dtype=weight.dtype)  # anything not overwritten shows
    ok = lib.simt_insert_prompt_fwd(ids.data_ptr(), ids.stride(0), ids.stride(1), weight.data_ptr(), weight.stride(0),
                                    weight.shape[0], prompt.data_ptr(), prompt.stride(0), out.data_ptr(), B, k, n, d,
                                    CODES[weight.dtype], max_blocks)
    assert ok == 1
    return out


def backward(lib, grad_out, k, max_blocks=0):
    grad_prompt = torch.full((k, grad_out.shape[2]), 7.0)
    ok = lib.simt_insert_prompt_bwd(grad_out.data_ptr(), *grad_out.stride(), grad_prompt.data_ptr(),
                                    grad_out.shape[0], k, grad_out.shape[2], CODES[grad_out.dtype], max_blocks)
    assert ok == 1
    return grad_prompt


def vectorized(lib, weight, prompt, out, B, n):
    return bool(lib.simt_insert_prompt_vectorized(weight.data_ptr(), weight.stride(0), prompt.data_ptr(),
                                                  prompt.stride(0), out.data_ptr(), B, prompt.shape[0], n,
                                                  weight.shape[1], CODES[weight.dtype]))


def make(B, k, n, d, V=13, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, n), generator=gen)
    return ids, torch.randn(V, d, generator=gen).to(dtype), torch.randn(k, d, generator=gen).to(dtype)


def expected(ids, weight, prompt):
    return torch.cat([prompt.expand(ids.shape[0], -1, -1), weight[ids]], dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [384, 100, 8, 3])
def test_forward_matches_the_oracle(lib, dtype, d):
    ids, weight, prompt = make(2, 3, 4, d, dtype=dtype)
    assert torch.equal(forward(lib, ids, weight, prompt), expected(ids, weight, prompt))


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (1, 1, 1)], ids=str)
def test_forward_empty_and_tiny_shapes(lib, shape):
    ids, weight, prompt = make(*shape, d=16)
    assert torch.equal(forward(lib, ids, weight, prompt), expected(ids, weight, prompt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_grid_stride_loop(lib, dtype):
    ids, weight, prompt = make(3, 2, 5, 24, dtype=dtype)  # 21 rows over 4 blocks
    assert torch.equal(forward(lib, ids, weight, prompt, max_blocks=4), expected(ids, weight, prompt))


def test_forward_strided_ids(lib):
    ids, weight, prompt = make(4, 2, 6, 16)
    view = ids.t()[1::2]  # [3, 4] with strides (2, 6)
    assert torch.equal(forward(lib, view, weight, prompt), expected(view, weight, prompt))


@pytest.mark.parametrize("dtype,d,vec", [(torch.bfloat16, 768, True), (torch.float16, 384, True),
                                         (torch.bfloat16, 100, False), (torch.float32, 100, True),
                                         (torch.float32, 3, False)], ids=str)
def test_vector_path_choice(lib, dtype, d, vec):
    _, weight, prompt = make(1, 2, 1, d, dtype=dtype)
    out = torch.empty(1, 3, d, dtype=dtype)
    assert vectorized(lib, weight, prompt, out, 1, 1) == vec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_weight_takes_the_scalar_path(lib, dtype):
    ids, weight, prompt = make(2, 3, 4, 64, dtype=dtype)
    shifted = torch.empty(weight.numel() + 1, dtype=dtype)[1:].view_as(weight)  # 16-byte rows, odd base address
    shifted.copy_(weight)
    out = torch.empty(2, 7, 64, dtype=dtype)
    assert vectorized(lib, weight, prompt, out, 2, 4) and not vectorized(lib, shifted, prompt, out, 2, 4)
    assert torch.equal(forward(lib, ids, shifted, prompt), expected(ids, weight, prompt))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 5])
def test_out_of_range_ids_give_nan_rows(lib, dtype, d):
    ids, weight, prompt = make(2, 2, 3, d, V=5, dtype=dtype)
    ids[0, 1], ids[1, 2] = 5, -1
    out = forward(lib, ids, weight, prompt)
    assert out[0, 3].isnan().all() and out[1, 4].isnan().all()
    good = torch.ones(2, 5, dtype=torch.bool)
    good[0, 3] = good[1, 4] = False
    safe = ids.clamp(0, 4)
    assert torch.equal(out[good], expected(safe, weight, prompt)[good])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,k,d", [(3, 4, 8), (19, 5, 100), (1, 2, 3), (0, 2, 8), (9, 7, 45)])
def test_backward_sums_over_rows(lib, dtype, B, k, d):
    grad_out = torch.randn(B, k + 3, d).to(dtype)
    got = backward(lib, grad_out, k)
    assert got.dtype == torch.float32
    ref = grad_out[:, :k].double().sum(0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)


def test_backward_any_strides_and_grid_stride(lib):
    base = torch.randn(6, 20, 11)
    for grad_out in (base.transpose(0, 1)[:, :4].transpose(0, 1),  # row stride 11, batch stride 220
                     base[:, :, ::2],  # element stride 2
                     torch.ones(()).expand(6, 9, 11)):  # the gradient of a sum: all strides 0
        ref = grad_out[:, :3].double().sum(0)
        for max_blocks in (0, 1, 2):
            torch.testing.assert_close(backward(lib, grad_out, 3, max_blocks).double(), ref, rtol=1e-6, atol=1e-5)


def test_backward_is_deterministic_and_order_fixed(lib):
    grad_out = torch.randn(37, 6, 40) * torch.logspace(-4, 4, 37)[:, None, None]
    first = backward(lib, grad_out, 6)
    assert torch.equal(first, backward(lib, grad_out, 6, max_blocks=1))
    # the documented order: slice s sums rows s, s + 8, ... in order; slices are then added s = 0 .. 7
    fixed = torch.zeros(6, 40)
    for s in range(8):
        partial = torch.zeros(6, 40)
        for b in range(s, 37, 8):
            partial = partial + grad_out[b, :6]
        fixed = fixed + partial
    assert torch.equal(first, fixed)


def test_unknown_dtype_code_launches_nothing(lib):
    ids, weight, prompt = make(1, 1, 1, 4)
    out = torch.zeros(1, 2, 4)
    assert lib.simt_insert_prompt_fwd(ids.data_ptr(), 1, 1, weight.data_ptr(), 4, 13, prompt.data_ptr(), 4,
                                      out.data_ptr(), 1, 1, 1, 4, 9, 0) == 0
    assert lib.simt_insert_prompt_bwd(out.data_ptr(), 8, 4, 1, out.data_ptr(), 1, 1, 4, 9, 0) == 0
